"""``python -m dino_jax.main`` whose train step also runs SLOW_STEP_MATMULS
512x512 matmuls (one after another) on the device.

For the signal-latency test: with a slow device and a fast input pipeline,
JAX's async dispatch lets the host loop queue steps far ahead of the
device, and a save must wait for every queued step. (A host callback that
sleeps would not do: XLA:CPU runs a computation with a host callback
synchronously, so nothing is queued.)
"""

import os

import jax
import jax.numpy as jnp
from absl import app

from dino_jax import main
from dino_jax import step as step_lib

MATMULS = int(os.environ['SLOW_STEP_MATMULS'])
_make_train_step = step_lib.make_train_step


def _burn(batch):
  x = jnp.full((512, 512), 1e-6) * jnp.mean(batch['image'])
  x = jax.lax.fori_loop(0, MATMULS, lambda _, x: jnp.tanh(x @ x), x)
  return jnp.sum(x)


def _make_slow_train_step(*args, **kwargs):
  train_step = _make_train_step(*args, **kwargs)

  def slow_train_step(state, batch):
    state, metrics = train_step(state, batch)
    return state, {**metrics, 'burn': _burn(batch)}  # a result: not pruned

  return slow_train_step


if __name__ == '__main__':
  step_lib.make_train_step = _make_slow_train_step
  app.run(main.main, flags_parser=main.parse_flags)
