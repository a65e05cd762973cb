"""SIGTERM and Ctrl-C: the handlers record, the work polls.

A handler installed by ``handled()`` only records the signal's name (and a
second Ctrl-C); nothing is raised from inside a handler, so nothing depends
on where the interpreter happened to be. Work that can take long looks at
the record where it can stop cleanly:

- the training loop (train.py), at the top of each step: save, then exit;
- its wait for the next batch (``Reader.next``), every 0.1 s;
- evaluations (eval/), between batches: ``check()`` raises ``Stopped``;
- a second Ctrl-C: ``check()`` raises KeyboardInterrupt wherever the work
  polls next; the run exits without saving.

Training on several processes leaves SIGTERM to JAX's preemption notifier
(the coordination service tells every process, and the loop stops at JAX's
preemption sync point, the same step everywhere); there evaluations do not
stop on their own (``local=False``), as every process must stop together.
"""

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.1


class Stopped(Exception):
  """A signal stopped the work at a ``check()``."""

  def __init__(self, signal_name: str):
    super().__init__(f'stopped by {signal_name}')
    self.signal_name = signal_name


# What the first signal's line says: training saves; an evaluation tool
# stops between batches and writes nothing partial.
SAVING = 'saving at the next step boundary, then exiting'
STOPPING = 'stopping at the next batch; nothing partial is written'


class Record:
  """What the handlers saw.

  Attributes:
    signal_name: 'SIGTERM' or 'SIGINT', the first signal; None before one.
    aborted: a second Ctrl-C came: exit at once, without saving.
    local: whether ``check()`` stops this process on its own (one process,
      or a tool); False in multi-process training (JAX's sync point).
    forwarded: multi-process training: the Ctrl-C was passed on to JAX's
      preemption notifier as SIGTERM.
  """

  def __init__(self, local: bool, announce: str = SAVING):
    self.announce = announce
    self.signal_name = None
    self.aborted = False
    self.local = local
    self.forwarded = False

  def handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      if signum == signal.SIGINT:
        self.aborted = True
      return
    self.signal_name = name
    logger.warning(
      '%s: %s%s',
      name,
      self.announce,
      ' (press Ctrl-C again to exit at once without saving)'
      if signum == signal.SIGINT and self.announce == SAVING
      else '',
    )


_active: Record | None = None


@contextlib.contextmanager
def handled(
  *, sigterm: bool = True, local: bool = True, announce: str = SAVING
):
  """Installs the recording handlers for the block; yields the Record.

  Args:
    sigterm: also handle SIGTERM (False: left to JAX's preemption notifier).
    local: whether ``check()`` stops this process on its own.
    announce: what the first signal's warning says will happen.

  Off the main thread (where Python cannot set handlers) the block runs
  with a Record that no signal reaches.
  """
  global _active
  record = Record(local, announce)
  previous = {}
  if threading.current_thread() is threading.main_thread():
    # SIGINT is set even when inherited ignored (a background job, a test
    # runner): a Ctrl-C must save.
    for signum in [signal.SIGINT] + ([signal.SIGTERM] if sigterm else []):
      previous[signum] = signal.signal(signum, record.handle)
  outer, _active = _active, record
  try:
    yield record
  finally:
    _active = outer
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def current() -> Record:
  """The innermost ``handled()`` block's Record (outside one: a Record no
  signal reaches)."""
  return _active if _active is not None else Record(local=True)


def requested() -> str | None:
  """The name of the signal that came, or None."""
  return current().signal_name


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


def forward_to_jax(record: Record) -> None:
  """Multi-process training: a Ctrl-C becomes the SIGTERM that JAX's
  preemption notifier passes to every process (once)."""
  if record.signal_name == 'SIGINT' and not record.forwarded:
    record.forwarded = True
    os.kill(os.getpid(), signal.SIGTERM)
