"""``python -m dino_jax.eval.copy_detection``: Copydays copy detection mAP.

The command's flags and errors are the shell's (``dino_jax.cli.evals``);
the evaluation itself is ``dino_jax.evaluation.copy_detection``.
"""

from dino_jax.cli import evals

if __name__ == '__main__':
  evals.entry('copy_detection')
