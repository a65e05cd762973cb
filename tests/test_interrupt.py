"""Signals: the shell's handlers only record (dino_jax.cli.signals), the
library's waits poll (dino_jax.interrupt)."""

import os
import signal
import sys
import threading
import time

import pytest

from dino_jax import interrupt
from dino_jax.cli import signals


def _signal_self(signum):
  os.kill(os.getpid(), signum)
  time.sleep(0.05)  # the Python handler runs at the next bytecode


def test_handlers_only_record_and_check_raises_where_polled():
  hook, alarm = sys.unraisablehook, signal.getsignal(signal.SIGALRM)
  term = signal.getsignal(signal.SIGTERM)
  with signals.handled() as record:
    assert sys.unraisablehook is hook  # no re-raise machinery
    assert signal.getsignal(signal.SIGALRM) is alarm
    interrupt.check()  # nothing yet
    _signal_self(signal.SIGTERM)  # no exception here: only recorded
    assert interrupt.requested() == 'SIGTERM'
    with pytest.raises(interrupt.Stopped, match='stopped by SIGTERM'):
      interrupt.check()
    _signal_self(signal.SIGTERM)  # a second SIGTERM changes nothing
    assert not record.aborted
  assert interrupt.requested() is None  # handlers and record restored
  assert signal.getsignal(signal.SIGTERM) is term


def test_second_ctrl_c_aborts_at_the_next_check():
  with signals.handled() as record:
    _signal_self(signal.SIGINT)
    assert record.signal_name == 'SIGINT' and not record.aborted
    _signal_self(signal.SIGINT)
    assert record.aborted
    with pytest.raises(KeyboardInterrupt):
      interrupt.check()


def test_not_local_records_but_does_not_stop():
  # Multi-process training: the processes stop together (JAX's sync point),
  # never one alone in an evaluation.
  term = signal.getsignal(signal.SIGTERM)
  with signals.handled(sigterm=False, local=False):
    assert signal.getsignal(signal.SIGTERM) is term  # left to JAX
    _signal_self(signal.SIGINT)
    assert interrupt.requested() == 'SIGINT'
    interrupt.check()  # no raise


def test_ctrl_c_is_forwarded_once_to_the_sigterm_handler_it_left():
  # Multi-process training: SIGTERM is JAX's preemption notifier's (here a
  # stand-in that counts); the first Ctrl-C reaches it as SIGTERM, once.
  notices = []
  previous = signal.signal(signal.SIGTERM, lambda *_: notices.append(1))
  try:
    with signals.handled(sigterm=False, local=False, forward=True) as record:
      _signal_self(signal.SIGINT)
      assert notices == [1] and record.signal_name == 'SIGINT'
      _signal_self(signal.SIGINT)  # the second: abort, no second notice
      assert notices == [1] and record.aborted
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_the_library_record_needs_no_signal():
  # What the shell's handlers write, written by hand: the library polls it.
  record = interrupt.Record(local=True)
  with interrupt.active(record):
    interrupt.check()
    assert record.note('SIGTERM') and not record.note('SIGTERM')
    assert not record.aborted
    with pytest.raises(interrupt.Stopped, match='stopped by SIGTERM'):
      interrupt.check()
    assert not record.note('SIGINT') and record.aborted
    with pytest.raises(KeyboardInterrupt):
      interrupt.check()
  assert interrupt.requested() is None


class _Stalling:
  """Yields 0, 1, then blocks until released; counts the reads."""

  def __init__(self):
    self.reads = 0
    self.release = threading.Event()
    self.closed = False

  def __next__(self):
    self.reads += 1
    if self.reads == 3:
      self.release.wait(60)
    return self.reads - 1

  def close(self):
    self.closed = True
    self.release.set()


def test_reader_wait_stops_on_a_signal_and_reads_only_when_asked():
  data = _Stalling()
  with signals.handled():
    reader = interrupt.Reader(data)
    assert [reader.next(), reader.next()] == [0, 1]
    time.sleep(0.3)
    assert data.reads == 2  # no read ahead
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    began = time.monotonic()
    with pytest.raises(interrupt.Stopped):
      reader.next()  # stalled: only the signal ends the wait
    assert time.monotonic() - began < 5
    reader.close()
    assert data.closed
    assert not reader._thread.is_alive()


def test_reader_passes_errors_and_the_end():
  def items():
    yield 'a'
    raise ValueError('bad record')

  reader = interrupt.Reader(items())
  assert reader.next() == 'a'
  with pytest.raises(ValueError, match='bad record'):
    reader.next()
  reader.close()
  reader = interrupt.Reader(iter([1]))
  assert reader.next() == 1
  for _ in range(2):
    with pytest.raises(StopIteration):
      reader.next()
  reader.close()


class _SlowRead:
  """The second read takes 2.5 s; records whether close came during one."""

  def __init__(self):
    self.reads = 0
    self.reading = False
    self.closed_during_read = None

  def __next__(self):
    self.reads += 1
    self.reading = True
    time.sleep(2.5 if self.reads == 2 else 0)
    self.reading = False
    return self.reads

  def close(self):
    self.closed_during_read = self.reading


def test_reader_close_lets_a_read_in_progress_end_first():
  # grain's iterator closed under a read leaves the read blocked for good,
  # and the batches it was handed over in are left to the resource tracker
  # ("leaked shared_memory objects", seen in CI under load).
  data = _SlowRead()
  with signals.handled():
    reader = interrupt.Reader(data)
    assert reader.next() == 1
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    with pytest.raises(interrupt.Stopped):
      reader.next()  # the signal stops the wait, the read goes on
    reader.close()
  assert data.closed_during_read is False
  assert not reader._thread.is_alive()


# A Ctrl-C while the program exits (the soak test's second SIGINT landed in
# JAX's exit handler, after the save): before, Python's handler raised
# KeyboardInterrupt in an exit handler and printed a traceback; now the
# process ends by the signal at once. The Ctrl-C is sent by an exit handler
# registered before the program's, so it runs after JAX's.
_LATE_CTRL_C = """
import atexit, os, runpy, signal, sys, time
def late_ctrl_c():
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(2)
  print('survived the Ctrl-C', file=sys.stderr)
atexit.register(late_ctrl_c)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


@pytest.mark.parametrize(
  'module, args, line',
  [
    (
      'dino_jax.main',
      ['--config=tests/tiny_config.py', '--config.model.arch=vit_huge'],
      "error: model.arch='vit_huge' unknown",
    ),
    ('dino_jax.eval.knn', [], 'error: --workdir'),
  ],
)
def test_ctrl_c_during_the_exit_ends_it_without_a_traceback(
  tmp_path, module, args, line
):
  import subprocess

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
    [
      sys.executable,
      '-c',
      _LATE_CTRL_C,
      module,
      f'--workdir={tmp_path / "w"}',
      *args,
    ],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == -signal.SIGINT, result.stderr[-3000:]
  assert line in result.stderr, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert 'survived' not in result.stderr
