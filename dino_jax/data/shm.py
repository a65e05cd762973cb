"""Shared memory of the data workers: none left in /dev/shm, SIGKILL included.

grain's worker processes hand each batch over in a POSIX shared memory
segment (``multiprocessing.shared_memory``). A segment nobody unlinks stays
in /dev/shm (RAM) until the machine reboots. CPython's resource tracker
unlinks what a dead program registered, but three gaps need CPython's and
grain's private names, for which no supported mechanism exists:

* The tracker is started in the program's process group, so a scheduler's
  SIGKILL to the group kills it with the program. Nothing public starts it
  elsewhere (``multiprocessing.resource_tracker`` is undocumented as a
  whole): ``start_resource_tracker`` starts it in a session of its own.
* ``SharedMemory(create=True)`` registers a segment only after creating,
  sizing and mapping it, with no hook to register it earlier (Python 3.13's
  ``track=False`` only turns tracking off; grain creates the segments):
  ``track_shared_memory_from_creation`` registers it before it exists.
* grain unlinks a batch's segment on a deletion thread of its own and has
  no public way to wait for it: ``release_shared_memory`` drains it.

Every private name relied on, and what for (``check_private_apis`` checks
each one, ``tests/test_shm.py`` runs it on the installed versions):

CPython ``multiprocessing.shared_memory``
  ``_USE_POSIX``: POSIX shared memory (``_posixshmem``) is in use.
  ``_posixshmem`` (``.shm_open``): the C module ``SharedMemory`` calls, as
  ``_posixshmem.shm_open(name, flags, mode=mode)`` looked up as the module's
  global at each call; replaced by ``_TrackedPosixShm``, which registers an
  exclusive create's name first.
CPython ``multiprocessing.resource_tracker``
  ``_resource_tracker``: the process's tracker, the one ``register`` and
  the spawned workers use; there is no public handle on it.
  ``_resource_tracker._lock``: held while it is started, as CPython does.
  ``_resource_tracker._fd``: the write end of the tracker's pipe; None
  until started. Set to the pipe of the tracker started here.
  ``_resource_tracker._pid``: set to None (not ours to wait for; CPython
  does the same in child processes).
  ``_CLEANUP_FUNCS['shared_memory']``: the tracker unlinks segments
  registered as 'shared_memory' (its tracker process runs ``main``).
  ``main(fd)``, ``register``, ``unregister``, ``ensure_running``: public
  names of an undocumented module.
CPython ``multiprocessing.util._args_from_interpreter_flags`` and
``multiprocessing.spawn.get_executable`` (undocumented): the tracker's
command line, as CPython builds it.
grain ``grain._src.python.ipc.shared_memory_array`` (``grain._src``: no
public API)
  ``SharedMemoryArray._del_thread_pool``: grain's deletion thread (None
  until its workers start); one thread (grain's ``enable_async_del(1)``),
  so a no-op run on it returns once all deletions before it are done.

Behaviour a name check cannot see is tested instead: the name registered
before the segment exists (``tests/test_shm.py``), the tracker in its own
session and alive after the group's SIGKILL (``tests/test_shm.py``,
``tests/test_data.py``, ``tests/test_cli.py -k sigkill``), the deletion
thread drained (``tests/test_eval.py``).

Verified with ``VERIFIED_PYTHON`` and ``VERIFIED_GRAIN``. Another version
with every name present runs, with one warning per program; a name missing
or changed raises ``PrivateApiError`` when the pipeline starts its workers,
or wherever a function here needs it.
"""

import gc
import importlib
import importlib.metadata
import logging
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Iterable
from multiprocessing import resource_tracker, shared_memory, spawn, util

logger = logging.getLogger(__name__)

# Versions this module and its tests were verified with: CPython by minor
# version (3.11.7 run), grain exactly.
VERIFIED_PYTHON = ('3.11',)
VERIFIED_GRAIN = ('0.2.18',)

GRAIN_SHARED_MEMORY = 'grain._src.python.ipc.shared_memory_array'


class PrivateApiError(RuntimeError):
  """A private name of CPython or grain that this module needs is gone."""


_SHARED_MEMORY = 'multiprocessing.shared_memory'
_TRACKER = 'multiprocessing.resource_tracker'
_KINDS = {
  'callable': callable,
  'a bool': lambda v: isinstance(v, bool),
  'an int or None': lambda v: v is None or isinstance(v, int),
  'a lock': lambda v: all(
    callable(getattr(v, m, None)) for m in ('__enter__', '__exit__')
  ),
  "a mapping with 'shared_memory'": lambda v: 'shared_memory' in v,
  'None or a thread pool': lambda v: (
    v is None or callable(getattr(v, 'apply', None))
  ),
}
# (module, attribute path, kind in _KINDS), by group.
_CPYTHON = (
  (_SHARED_MEMORY, '_USE_POSIX', 'a bool'),
  (_TRACKER, '_resource_tracker._lock', 'a lock'),
  (_TRACKER, '_resource_tracker._fd', 'an int or None'),
  (_TRACKER, '_resource_tracker._pid', 'an int or None'),
  (_TRACKER, '_CLEANUP_FUNCS', "a mapping with 'shared_memory'"),
  (_TRACKER, 'main', 'callable'),
  (_TRACKER, 'register', 'callable'),
  (_TRACKER, 'unregister', 'callable'),
  (_TRACKER, 'ensure_running', 'callable'),
  ('multiprocessing.spawn', 'get_executable', 'callable'),
  ('multiprocessing.util', '_args_from_interpreter_flags', 'callable'),
)
_POSIX = ((_SHARED_MEMORY, '_posixshmem.shm_open', 'callable'),)
_GRAIN = (
  (
    GRAIN_SHARED_MEMORY,
    'SharedMemoryArray._del_thread_pool',
    'None or a thread pool',
  ),
)

GROUPS = ('cpython', 'grain')
_passed: set[str] = set()  # groups checked in this process


def _python_version() -> str:
  return '.'.join(map(str, sys.version_info[:3]))


def _grain_version() -> str:
  try:
    return importlib.metadata.version('grain')
  except importlib.metadata.PackageNotFoundError:
    return 'unknown'


def _problems(names) -> list[str]:
  """'module.name: what is wrong' for each name that is not as expected."""
  problems = []
  for module_name, path, kind in names:
    try:
      value = importlib.import_module(module_name)
    except ImportError as e:
      problems.append(f'{module_name}: cannot be imported ({e})')
      continue
    parts = path.split('.')
    for i, part in enumerate(parts):
      try:
        value = getattr(value, part)
      except AttributeError:
        problems.append(f'{module_name}.{".".join(parts[: i + 1])}: missing')
        break
    else:
      try:
        ok = _KINDS[kind](value)
      except Exception:  # a kind that cannot even be looked at: a change
        ok = False
      if not ok:
        name = f'{module_name}.{path}'
        problems.append(f'{name}: not {kind} ({type(value).__name__})')
  return list(dict.fromkeys(problems))  # a parent missing: named once


def _group_problems(group: str) -> list[str]:
  if group == 'grain':
    return _problems(_GRAIN)
  problems = _problems(_CPYTHON)
  if getattr(shared_memory, '_USE_POSIX', os.name == 'posix'):
    problems += _problems(_POSIX)
  return problems


def _warn_if_unverified(group: str) -> None:
  if group == 'grain':
    version, verified = _grain_version(), VERIFIED_GRAIN
  else:
    version, verified = _python_version(), VERIFIED_PYTHON
  if not any(version == v or version.startswith(v + '.') for v in verified):
    logger.warning(
      'dino_jax.data.shm: %s %s is not a version its private names were '
      'verified with (%s); all of them are present, so going on. Run '
      'tests/test_shm.py, tests/test_data.py and tests/test_cli.py -k '
      'sigkill, then add the version to dino_jax/data/shm.py',
      'grain' if group == 'grain' else 'Python',
      version,
      ', '.join(verified),
    )


def check_private_apis(groups: Iterable[str] = GROUPS) -> None:
  """Raises ``PrivateApiError`` naming every private name gone or changed.

  ``groups``: 'cpython', 'grain' or both. Each group is checked once per
  process; a version not in ``VERIFIED_*`` with every name present gets one
  warning, from the main process (not from each worker).
  """
  problems = []
  for group in groups:
    if group not in GROUPS:
      raise ValueError(f'unknown group {group!r}; one of {GROUPS}')
    if group in _passed:
      continue
    found = _group_problems(group)
    if found:
      problems += found
      continue
    _passed.add(group)
    if multiprocessing.parent_process() is None:
      _warn_if_unverified(group)
  if problems:
    raise PrivateApiError(
      f'Python {_python_version()} / grain {_grain_version()}: private '
      "names that keep the data workers' shared memory out of /dev/shm "
      'after a kill are gone or changed:\n  '
      + '\n  '.join(problems)
      + f'\nPin a verified version (Python {", ".join(VERIFIED_PYTHON)}; '
      f'grain {", ".join(VERIFIED_GRAIN)}) or update dino_jax/data/shm.py '
      '(its docstring says what each name is for).'
    )


class _TrackedPosixShm:
  """CPython's ``_posixshmem``, whose exclusive ``shm_open`` registers the
  name with the resource tracker before the segment exists."""

  def __init__(self, module):
    self._module = module

  def __getattr__(self, name):
    return getattr(self._module, name)

  def shm_open(self, path, flags, mode=0o777):
    exclusive = os.O_CREAT | os.O_EXCL
    if flags & exclusive != exclusive:
      return self._module.shm_open(path, flags, mode=mode)
    resource_tracker.register(path, 'shared_memory')
    try:
      return self._module.shm_open(path, flags, mode=mode)
    except FileExistsError:  # another's name: not ours to free
      resource_tracker.unregister(path, 'shared_memory')
      raise


def track_shared_memory_from_creation() -> None:
  """Shared memory this process creates is tracked from its first instant.

  ``SharedMemory(create=True)`` (grain's workers hand each batch over in
  one) creates the segment, sizes it, maps it and only then registers it
  with the resource tracker. A worker killed in between (a scheduler's
  SIGKILL to the group; on a busy machine the worker can lose the CPU in
  that gap) leaves a segment that nothing frees: CI saw it twice, once
  sized and once empty. Registered before it exists, it is freed by the
  tracker whenever the process dies (a process killed between the two
  costs the tracker one warning line). No public API: CPython looks
  ``_posixshmem`` up at call time, so the module's global is replaced.
  """
  check_private_apis(['cpython'])
  if shared_memory._USE_POSIX and not isinstance(
    shared_memory._posixshmem, _TrackedPosixShm
  ):
    shared_memory._posixshmem = _TrackedPosixShm(shared_memory._posixshmem)


def start_resource_tracker() -> None:
  """Starts this process's resource tracker in a session of its own.

  The tracker (CPython's ``multiprocessing.resource_tracker``) unlinks the
  shared memory that grain's workers hand batches over in, when every
  process of the program is gone. Started as CPython starts it, it is in
  the program's process group, so a scheduler's SIGKILL to the group kills
  it too and the segments stay in /dev/shm (RAM) until the machine reboots.
  In its own session it outlives the group, sees the program gone, and
  frees them. It ignores SIGTERM and SIGINT itself, as CPython's does; its
  warnings go to this process's stderr. A tracker already running (this
  process's, or its parent's) is kept, restarted by CPython if it died.
  """
  check_private_apis(['cpython'])
  tracker = resource_tracker._resource_tracker
  if tracker._fd is not None:
    resource_tracker.ensure_running()
    return
  with tracker._lock:
    if tracker._fd is not None:
      return
    read, write = os.pipe()
    try:
      command = 'from multiprocessing.resource_tracker import main; main(%d)'
      subprocess.Popen(
        [
          spawn.get_executable(),
          *util._args_from_interpreter_flags(),
          '-c',
          command % read,
        ],
        pass_fds=(read,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=None,  # this process's fd 2
        start_new_session=True,
        close_fds=True,
      )
      tracker._fd, tracker._pid = write, None  # not ours to wait for
    except BaseException:
      os.close(write)
      raise
    finally:
      os.close(read)


def release_shared_memory() -> None:
  """Frees now the shared memory of grain batches no longer referenced.

  A batch read from a data worker unlinks its shared memory when deleted,
  but asynchronously, on grain's deletion thread, and batches held in a
  reference cycle (grain's prefetch threads end in a StopIteration whose
  traceback keeps their last batches alive; a traceback keeps the loop's
  last batch) wait for the collector. Left to the exit, they are freed by
  the resource tracker with a warning about leaked objects. Collected here,
  and the deletion thread drained.
  """
  gc.collect()
  check_private_apis(['grain'])
  shared_memory_array = importlib.import_module(GRAIN_SHARED_MEMORY)
  deleter = shared_memory_array.SharedMemoryArray._del_thread_pool
  if deleter is not None:  # grain's workers started it
    deleter.apply(lambda: None)  # one thread, in order: all before are done
