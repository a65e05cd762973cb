"""``python -m dino_jax.main`` that gets a signal inside a gc callback.

Python swallows an exception raised in a gc callback ("Exception ignored
in"), and a signal's Python handler runs wherever the main thread is: a
signal that lands while a callback runs (JAX registers one, and tracing and
compiling collect often) can lose the exception its handler raises. This
makes that landing certain: the callback sends the signal to its own
process and runs a loop, in which the handler runs.

GC_SIGNAL=startup: SIGINT as the checkpoint restore begins.
GC_SIGNAL=wait: SIGTERM (from a gc callback on the main thread) as the
  loop begins to wait for batch 3, which the data pipeline delays by 120 s
  (a stalled pipeline).
"""

import gc
import os
import signal
import time

from absl import app

from dino_jax import checkpoint, interrupt, main
from dino_jax.data import pipeline


def signal_in_gc_callback(signum):
  fired = []

  def callback(phase, info):
    del info
    if phase == 'start' and not fired:
      fired.append(True)
      os.kill(os.getpid(), signum)
      for _ in range(100_000):  # the signal's Python handler runs in here
        pass

  gc.callbacks.append(callback)
  try:
    gc.collect()
  finally:
    gc.callbacks.remove(callback)


_restore_newest = checkpoint.Checkpointer.restore_newest


def _restore_newest_after_ctrl_c(self, *args, **kwargs):
  signal_in_gc_callback(signal.SIGINT)
  return _restore_newest(self, *args, **kwargs)


class _StallingIterator:
  def __init__(self, it):
    self._it = it
    self._calls = 0

  def __next__(self):
    self._calls += 1
    if self._calls == 3:
      time.sleep(120)
    return next(self._it)

  def close(self):
    self._it.close()


class _Stalling:
  def __init__(self, ds):
    self._ds = ds

  def __iter__(self):
    return _StallingIterator(iter(self._ds))


_train_dataset = pipeline.train_dataset
_reader_next = interrupt.Reader.next
_main_thread_reads = []


def _reader_next_signalled(self):
  """The loop's third read (batch 3) begins with a SIGTERM."""
  _main_thread_reads.append(True)
  if len(_main_thread_reads) == 3:
    signal_in_gc_callback(signal.SIGTERM)
  return _reader_next(self)


def _stalling_train_dataset(*args, **kwargs):
  return _Stalling(_train_dataset(*args, **kwargs))


if __name__ == '__main__':
  if os.environ.get('GC_SIGNAL', 'startup') == 'startup':
    checkpoint.Checkpointer.restore_newest = _restore_newest_after_ctrl_c
  else:
    pipeline.train_dataset = _stalling_train_dataset
    interrupt.Reader.next = _reader_next_signalled
  app.run(main.main, flags_parser=main.parse_flags)
