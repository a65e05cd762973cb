"""The run directory: path checks and the one-run-per-workdir lock.

A workdir holds one run: ``checkpoints/``, ``metrics.jsonl``,
``config.json``, ``eval/``. Two runs writing into it at once would overwrite
each other's checkpoints and double every metrics row, so process 0 of a run
holds an exclusive ``flock`` on ``WORKDIR/lock`` for as long as it trains.
The kernel drops the lock when the process dies (even by SIGKILL), so a lock
is never stale; the file itself stays and names the last holder.
"""

import datetime
import fcntl
import json
import os
import socket


class WorkdirError(ValueError):
  """The workdir cannot be used; the message says why and what to do."""


def check_path(workdir: str) -> None:
  """Raises WorkdirError unless ``workdir`` is, or can become, a directory.

  Creates nothing: a run that fails its checks leaves no trace.
  """
  if not workdir:
    raise WorkdirError('--workdir is empty; pass a directory')
  path = os.path.abspath(workdir)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise WorkdirError(
        f'--workdir={workdir} is a file, not a directory; pass a directory'
      )
    if not os.access(path, os.W_OK | os.X_OK):
      raise WorkdirError(
        f'--workdir={workdir} is not writable; pass a directory you can '
        'write to'
      )
    return
  parent = path
  while not os.path.exists(parent):  # the nearest existing ancestor
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise WorkdirError(
      f'--workdir={workdir} cannot be created ({parent} is not a writable '
      'directory); pass a directory you can write to'
    )
  if os.path.realpath(parent).startswith(('/proc', '/sys')):
    raise WorkdirError(
      f'--workdir={workdir} is under {parent}, a kernel file system; pass '
      'a directory on a disk'
    )


def create(workdir: str) -> None:
  """``os.makedirs`` with a WorkdirError instead of an OSError."""
  check_path(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(
      f'--workdir={workdir} cannot be created: {e.strerror}; pass a '
      'directory you can write to'
    ) from e


class Lock:
  """Exclusive lock on ``WORKDIR/lock``; a context manager.

  Raises WorkdirError on entry when another process holds it, naming the
  holder (pid, host, start time) as written in the file.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, 'lock')
    self._fd = None

  def acquire(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirError(
        f'--workdir={self.workdir} is in use by {holder}; wait for that run '
        'to end or pass another --workdir'
      ) from None
    os.ftruncate(fd, 0)
    info = {
      'pid': os.getpid(),
      'host': socket.gethostname(),
      'started': datetime.datetime.now().isoformat(timespec='seconds'),
    }
    os.pwrite(fd, (json.dumps(info) + '\n').encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def _read_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or '{}')
    return (
      f'pid {info["pid"]} on host {info["host"]} (started {info["started"]})'
    )
  except (ValueError, KeyError):
    return 'another process'
