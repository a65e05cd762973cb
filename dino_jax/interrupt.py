"""Stopping cleanly: the stop request that long work polls.

The library touches no signal. The shell (``dino_jax.cli.signals``) makes a
``Record`` active (``active()``) and its handlers only write into it: the
first signal's name, and whether a second Ctrl-C came. Nothing is raised
from inside a handler, so nothing depends on where the interpreter happened
to be. Work that can take long looks at the record where it can stop
cleanly:

- the training loop (train.py), at the top of each step: save, then exit;
- its wait for the next batch (``Reader.next``), every 0.1 s;
- evaluations (eval/), between batches: ``check()`` raises ``Stopped``;
- a second Ctrl-C: ``check()`` raises KeyboardInterrupt wherever the work
  polls next; the run exits without saving.

Training on several processes stops where JAX's preemption sync point says,
the same step everywhere (train.py, through Orbax); there evaluations do not
stop on their own (``local=False``), as every process must stop together.
"""

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.1


class Stopped(Exception):
  """A stop request ended the work at a ``check()``."""

  def __init__(self, signal_name: str):
    super().__init__(f'stopped by {signal_name}')
    self.signal_name = signal_name


class Record:
  """What was requested; written by the shell's signal handlers.

  Attributes:
    signal_name: 'SIGTERM' or 'SIGINT', the first request; None before one.
    aborted: a second Ctrl-C came: exit at once, without saving.
    local: whether ``check()`` stops this process on its own (one process,
      or a tool); False in multi-process training (JAX's sync point).
  """

  def __init__(self, local: bool = True):
    self.signal_name = None
    self.aborted = False
    self.local = local

  def note(self, signal_name: str) -> bool:
    """Records a request; True for the first. A later SIGINT (a second
    Ctrl-C) aborts; a later SIGTERM changes nothing."""
    if self.signal_name is None:
      self.signal_name = signal_name
      return True
    if signal_name == 'SIGINT':
      self.aborted = True
    return False


_active: Record | None = None


@contextlib.contextmanager
def active(record: Record):
  """Makes ``record`` the one ``current()``, ``check()`` and ``Reader``
  read for the block (blocks nest)."""
  global _active
  outer, _active = _active, record
  try:
    yield record
  finally:
    _active = outer


def current() -> Record:
  """The innermost ``active()`` block's Record (outside one: a Record
  nothing writes)."""
  return _active if _active is not None else Record()


def requested() -> str | None:
  """The name of the signal that came, or None."""
  return current().signal_name


def raise_if_aborted() -> None:
  """KeyboardInterrupt after a second Ctrl-C (exit without saving); else
  returns, whatever else was requested."""
  if current().aborted:
    raise KeyboardInterrupt


def check() -> None:
  """Raises KeyboardInterrupt after a second Ctrl-C, ``Stopped`` after a
  signal (where this process stops on its own); else returns."""
  record = _active
  if record is None:
    return
  if record.aborted:
    raise KeyboardInterrupt
  if record.signal_name is not None and record.local:
    raise Stopped(record.signal_name)


class Reader:
  """An iterator read on a thread, so that waiting for it can be stopped.

  ``next()`` asks the thread for the next item and waits for it in steps of
  ``POLL_SECONDS``, calling ``check()`` between them: a stalled input
  pipeline holds back neither a save nor a second Ctrl-C. The thread reads
  only when asked (no read ahead); a read that a signal left waiting is
  taken by the next ``next()``, or dropped by ``close()``, which then
  closes the iterator (grain: stops its threads).
  """

  _END = object()

  def __init__(self, iterator: Iterator, name: str = 'dino_jax reader'):
    self._iterator = iterator
    self._requests = queue.Queue()
    self._items = queue.Queue()
    self._asked = self._ended = self._closed = False
    self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
    self._thread.start()

  def _serve(self) -> None:
    while self._requests.get():
      try:
        item = (next(self._iterator), None)
      except StopIteration:
        item = (self._END, None)
      except Exception as error:  # noqa: BLE001 - handed to the reader
        item = (None, error)
      self._items.put(item)

  def next(self):
    """The next item; raises what reading it raised, or what ``check()``
    raises while waiting."""
    if self._ended:
      raise StopIteration
    if not self._asked:
      self._requests.put(True)
      self._asked = True
    while True:
      check()
      try:
        item, error = self._items.get(timeout=POLL_SECONDS)
        break
      except queue.Empty:
        continue
    self._asked = False
    if error is not None:
      raise error
    if item is self._END:
      self._ended = True
      raise StopIteration
    return item

  def close(self, wait: float = 10.0) -> None:
    """Ends the thread and closes the iterator; idempotent.

    A read that a signal left waiting is first given up to ``wait`` seconds
    to end (sooner after a second Ctrl-C): closing grain's iterator under
    a read leaves the read blocked for good, with the batches it was
    handed over in left to the resource tracker.
    """
    if self._closed:
      return
    self._closed = True
    deadline = time.monotonic() + wait
    while self._asked and time.monotonic() < deadline:
      if current().aborted:
        break
      with contextlib.suppress(queue.Empty):
        self._items.get(timeout=POLL_SECONDS)  # dropped: its memory freed
        self._asked = False
    self._requests.put(False)
    if not self._asked:
      self._thread.join(timeout=5)  # idle: it ends at once
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()
    self._thread.join(timeout=5)
    if self._thread.is_alive():  # a stalled read the close did not end
      logger.warning('the input pipeline did not stop within %.0f s', wait)
