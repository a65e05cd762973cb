"""``python -m dino_jax.eval.video``: DAVIS 2017 video object segmentation J&F.

The command's flags and errors are the shell's (``dino_jax.cli.evals``);
the evaluation itself is ``dino_jax.evaluation.video``.
"""

from dino_jax.cli import evals

if __name__ == '__main__':
  evals.entry('video')
