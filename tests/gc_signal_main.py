"""``python -m dino_jax.main`` that gets a Ctrl-C inside a gc callback at
startup, as the checkpoint restore begins.

Python swallows an exception raised in a gc callback ("Exception ignored
in"), and its default SIGINT handler raises KeyboardInterrupt wherever the
main thread is: a Ctrl-C that lands while a callback runs (JAX registers
one, and tracing and compiling collect often) is lost. This makes that
landing certain: the callback sends SIGINT to its own process and runs a
loop, in which the Python-level handler runs.
"""

import gc
import os
import signal

import jax
from absl import app

from dino_jax import checkpoint, main

_restore_newest = checkpoint.Checkpointer.restore_newest


def _restore_newest_after_ctrl_c(self, *args, **kwargs):
  fired = []

  def callback(phase, info):
    del info
    if phase == 'start' and not fired:
      fired.append(True)
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(100_000):  # the signal's Python handler runs in here
        pass

  gc.callbacks.append(callback)
  try:
    gc.collect()
  finally:
    gc.callbacks.remove(callback)
  return _restore_newest(self, *args, **kwargs)


if __name__ == '__main__':
  checkpoint.Checkpointer.restore_newest = _restore_newest_after_ctrl_c
  jax.config.update('jax_threefry_partitionable', True)
  app.run(main.main, flags_parser=main.parse_flags)
