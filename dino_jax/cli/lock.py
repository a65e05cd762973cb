"""The one-run-per-workdir lock, held by process 0 while a run trains.

Two runs writing into one workdir would overwrite each other's checkpoints
and double every metrics row, so the training CLI holds ``WORKDIR/lock``
for as long as it trains (``train.train_and_evaluate(..., hold=lock)``). On
a disk that is an exclusive ``flock``: the kernel drops it when the process
dies (even by SIGKILL), so it is never stale; the file itself stays and
names the last holder. On ``gs://`` it is an object created only if absent,
kept alive by a heartbeat and taken over when stale (``ObjectLock``).
"""

import datetime
import fcntl
import json
import logging
import os
import signal
import socket
import threading

from dino_jax import storage
from dino_jax.workdir import WorkdirError


def lock(workdir: str):
  """The lock of ``workdir``: ``Lock`` (flock) on a disk, ``ObjectLock``
  on ``gs://``, none (a warning) on other URLs; a context manager."""
  if workdir.startswith('gs://'):
    return ObjectLock(workdir)
  if storage.is_remote(workdir):
    logging.getLogger(__name__).warning(
      'no lock for %s: nothing stops a second run on this workdir (only '
      'gs:// and local workdirs are locked)',
      workdir,
    )
    return _NoLock()
  return Lock(workdir)


class _NoLock:
  """The lock interface, locking nothing (URLs other than gs://)."""

  def acquire(self) -> None:
    pass

  def release(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass


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


# Object storage has no flock: the lock is an object, created only if absent.
LOCK_HEARTBEAT_S = 60.0
LOCK_STALE_S = 600.0


class ObjectLock:
  """``gs://.../WORKDIR/lock``: one run per workdir on object storage.

  Acquire uploads the holder's record (pid, host, start, heartbeat) only if
  no object exists (``if_generation_match=0``): of runs that start
  together, exactly one creates it. The holder rewrites it every
  ``heartbeat_s`` seconds, each time only if it is still the generation it
  wrote, and on exit marks it released (the object stays and names the last
  holder, as the local lock file does). A lock not refreshed for
  ``stale_s`` seconds, by the server's clock against this host's, is
  taken over (a run killed without warning, e.g. a TPU VM that was
  preempted), and so is one whose holder was on this host and is gone. A
  holder that finds its lock taken over stops as on SIGTERM (save, exit).

  Raises WorkdirError on entry when another run holds it.
  """

  def __init__(
    self,
    workdir: str,
    heartbeat_s: float = LOCK_HEARTBEAT_S,
    stale_s: float = LOCK_STALE_S,
  ):
    from google.cloud import storage as gcs

    self.workdir = workdir
    self.path = storage.join(workdir, 'lock')
    bucket, name = self.path[len('gs://') :].split('/', 1)
    self._blob = gcs.Client(project=None).bucket(bucket).blob(name)
    self._precondition_failed = _precondition_failed()
    self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
    self._generation = None
    self._started = datetime.datetime.now().isoformat(timespec='seconds')
    self._stop = threading.Event()
    self._thread = None
    self.lost = False

  def _record(self, state: str) -> str:
    return json.dumps(
      {
        'pid': os.getpid(),
        'host': socket.gethostname(),
        'started': self._started,
        'heartbeat': datetime.datetime.now().isoformat(timespec='seconds'),
        'state': state,
      }
    )

  def _upload(self, state: str, generation: int) -> None:
    self._blob.upload_from_string(
      self._record(state),
      content_type='application/json',
      if_generation_match=generation,
      timeout=_LOCK_REQUEST_S,
    )
    self._generation = self._blob.generation

  def acquire(self) -> None:
    try:
      self._upload('held', 0)
    except self._precondition_failed:
      self._take_over_or_raise()
    self._thread = threading.Thread(
      target=self._beat, daemon=True, name='dino-lock-heartbeat'
    )
    self._thread.start()

  def _take_over_or_raise(self) -> None:
    blob = self._blob.bucket.get_blob(self._blob.name, timeout=_LOCK_REQUEST_S)
    if blob is None:  # released by deletion meanwhile: create it again
      self._upload('held', 0)
      return
    try:
      record = json.loads(blob.download_as_text(timeout=_LOCK_REQUEST_S))
    except ValueError:
      record = {}
    now = datetime.datetime.now(datetime.UTC)
    age = (now - blob.updated).total_seconds()
    gone = (
      record.get('host') == socket.gethostname()
      and isinstance(record.get('pid'), int)
      and not _pid_alive(record['pid'])
    )
    holder = _describe(record)
    if record.get('state') == 'held' and age <= self.stale_s and not gone:
      raise WorkdirError(
        f'--workdir={self.workdir} is in use by {holder}, last heartbeat '
        f'{age:.0f} s ago; wait for that run to end or pass another '
        f'--workdir (a lock not refreshed for {self.stale_s:.0f} s is taken '
        f'over; if that run is gone: gcloud storage rm {self.path})'
      )
    try:
      self._upload('held', blob.generation)
    except self._precondition_failed:  # another run took it first
      raise WorkdirError(
        f'--workdir={self.workdir} was just taken by another run; wait for '
        'it to end or pass another --workdir'
      ) from None
    if record.get('state') == 'held':
      logging.getLogger(__name__).warning(
        'took over the lock %s of %s (%s)',
        self.path,
        holder,
        'gone from this host'
        if gone
        else f'no heartbeat for {age:.0f} s > {self.stale_s:.0f} s',
      )

  def _beat(self) -> None:
    logger = logging.getLogger(__name__)
    while not self._stop.wait(self.heartbeat_s):
      try:
        self._upload('held', self._generation)
      except self._precondition_failed:
        if self._still_mine():
          continue  # an earlier beat landed although its answer was lost
        self.lost = True
        logger.error(
          'lock %s was taken over by another run: stopping this one as on '
          'SIGTERM (saving first)',
          self.path,
        )
        os.kill(os.getpid(), signal.SIGTERM)
        return
      except Exception as e:  # noqa: BLE001 - a missed beat is retried
        logger.warning('lock heartbeat to %s failed: %s', self.path, e)

  def _still_mine(self) -> bool:
    """Whether the lock object still names this run; adopts its
    generation if so."""
    try:
      blob = self._blob.bucket.get_blob(
        self._blob.name, timeout=_LOCK_REQUEST_S
      )
      record = json.loads(blob.download_as_text(timeout=_LOCK_REQUEST_S))
    except Exception:  # noqa: BLE001 - unknown: treated as lost
      return False
    mine = (
      record.get('state') == 'held'
      and record.get('pid') == os.getpid()
      and record.get('host') == socket.gethostname()
      and record.get('started') == self._started
    )
    if mine:
      self._generation = blob.generation
    return mine

  def release(self) -> None:
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    if self.lost:
      return
    try:
      self._upload('released', self._generation)
    except Exception as e:  # noqa: BLE001 - the next run sees it stale
      logging.getLogger(__name__).warning(
        'could not release the lock %s (%s); the next run takes it over '
        'after %.0f s',
        self.path,
        e,
        self.stale_s,
      )

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


_LOCK_REQUEST_S = 30.0


def _precondition_failed() -> type[Exception]:
  from google.api_core import exceptions

  return exceptions.PreconditionFailed


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _describe(record: dict) -> str:
  try:
    return (
      f'pid {record["pid"]} on host {record["host"]} (started '
      f'{record["started"]})'
    )
  except KeyError:
    return 'another run'
