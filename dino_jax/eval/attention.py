"""``python -m dino_jax.eval.attention``: CLS attention maps of one image.

The command's flags and errors are the shell's (``dino_jax.cli.evals``);
the evaluation itself is ``dino_jax.evaluation.attention``.
"""

from dino_jax.cli import evals

if __name__ == '__main__':
  evals.entry('attention')
