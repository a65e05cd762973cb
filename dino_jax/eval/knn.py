"""``python -m dino_jax.eval.knn``: weighted k-NN (SPEC §7.1).

The command's flags and errors are the shell's (``dino_jax.cli.evals``);
the evaluation itself is ``dino_jax.evaluation.knn``.
"""

from dino_jax.cli import evals

if __name__ == '__main__':
  evals.entry('knn')
