"""SIGTERM and Ctrl-C: the handlers only record; the library polls.

``handled()`` installs handlers that write the signal into an
``interrupt.Record`` (the library's stop request) and say once what will
happen; the training loop and the evaluations poll that record where they
can stop cleanly (``dino_jax/interrupt.py``). A second Ctrl-C sets
``aborted``: the work raises KeyboardInterrupt where it polls next.

Training on several processes leaves SIGTERM to JAX's preemption notifier
(the coordination service tells every process; the loop stops at JAX's
preemption sync point, through Orbax, the same step everywhere). A Ctrl-C
there is recorded and passed on to that notifier as the process's own
SIGTERM (``forward=True``).
"""

import contextlib
import logging
import os
import signal
import threading

from dino_jax import interrupt

logger = logging.getLogger(__name__)

# What the first signal's line says: training saves; an evaluation tool
# stops between batches and writes nothing partial.
SAVING = 'saving at the next step boundary, then exiting'
STOPPING = 'stopping at the next batch; nothing partial is written'


class _Handler:
  """The handler of one ``handled()`` block: records, announces, and
  forwards a Ctrl-C to JAX's notifier when asked."""

  def __init__(self, record: interrupt.Record, announce: str, forward: bool):
    self.record, self.announce, self.forward = record, announce, forward
    self.forwarded = False

  def __call__(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if not self.record.note(name):
      return
    logger.warning(
      '%s: %s%s',
      name,
      self.announce,
      ' (press Ctrl-C again to exit at once without saving)'
      if signum == signal.SIGINT and self.announce == SAVING
      else '',
    )
    if self.forward and signum == signal.SIGINT and not self.forwarded:
      self.forwarded = True
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier: every process


@contextlib.contextmanager
def handled(
  *,
  sigterm: bool = True,
  local: bool = True,
  forward: bool = False,
  announce: str = SAVING,
):
  """Installs the recording handlers for the block; yields the Record.

  Args:
    sigterm: also handle SIGTERM (False: left to JAX's preemption notifier).
    local: whether ``interrupt.check()`` stops this process on its own.
    forward: pass the first Ctrl-C on as SIGTERM (to JAX's notifier, with
      ``sigterm=False``).
    announce: what the first signal's warning says will happen.

  Off the main thread (where Python cannot set handlers) the block runs
  with a Record that no signal reaches.
  """
  record = interrupt.Record(local)
  handler = _Handler(record, announce, forward)
  previous = {}
  if threading.current_thread() is threading.main_thread():
    # SIGINT is set even when inherited ignored (a background job, a test
    # runner): a Ctrl-C must save.
    for signum in [signal.SIGINT] + ([signal.SIGTERM] if sigterm else []):
      previous[signum] = signal.signal(signum, handler)
  try:
    with interrupt.active(record):
      yield record
  finally:
    for signum, old in previous.items():
      signal.signal(signum, old)


def ctrl_c_exits() -> None:
  """For a program whose work is over (saved, written or stopped): a Ctrl-C
  from here on, in the interpreter's exit (JAX's clean-up among the exit
  handlers), ends the process at once by the signal, where Python's own
  handler raised KeyboardInterrupt in an exit handler and printed its
  traceback. Nothing is left to save. Only the programs call this: a test
  that runs a command in-process keeps its handler."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.SIG_DFL)
