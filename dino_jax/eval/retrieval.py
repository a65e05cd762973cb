"""``python -m dino_jax.eval.retrieval``: rOxford / rParis retrieval mAP.

The command's flags and errors are the shell's (``dino_jax.cli.evals``);
the evaluation itself is ``dino_jax.evaluation.retrieval``.
"""

from dino_jax.cli import evals

if __name__ == '__main__':
  evals.entry('retrieval')
