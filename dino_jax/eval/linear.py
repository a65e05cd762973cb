"""``python -m dino_jax.eval.linear``: the linear probe (SPEC §7.2).

The command's flags and errors are the shell's (``dino_jax.cli.evals``);
the evaluation itself is ``dino_jax.evaluation.linear``.
"""

from dino_jax.cli import evals

if __name__ == '__main__':
  evals.entry('linear')
