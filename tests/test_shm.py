"""dino_jax.data.shm: the private names it relies on, checked loudly.

These tests break when CPython or grain changes a name the module relies on
(or the installed versions are not the ones verified): then pin the version,
or update dino_jax/data/shm.py and its VERIFIED_* lists.
"""

import os
import subprocess
import sys
import time
from multiprocessing import resource_tracker, shared_memory, util
from unittest import mock

from absl.testing import absltest, parameterized
from grain._src.python.ipc import shared_memory_array

from dino_jax.data import shm

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOGGER = 'dino_jax.data.shm'


def _stat(pid: int) -> list[str]:
  """/proc/<pid>/stat after the command: state, ppid, pgrp, session, ..."""
  with open(f'/proc/{pid}/stat') as f:
    return f.read().rsplit(')', 1)[1].split()


def _exited(pid: int) -> bool:
  """Gone, or a zombie (exited; its new parent has not reaped it yet)."""
  try:
    return _stat(pid)[0] == 'Z'
  except FileNotFoundError:
    return True


def _children(pid: int) -> list[int]:
  found = []
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        if int(_stat(int(entry))[1]) == pid:
          found.append(int(entry))
      except (FileNotFoundError, ProcessLookupError):
        pass
  return found


class _Case(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    # Each test checks afresh (the check runs once per process).
    self.enter_context(mock.patch.object(shm, '_passed', set()))

  def remove(self, owner, name):
    """Deletes ``owner.name`` (its own, not inherited) until the test ends."""
    value = vars(owner)[name]
    delattr(owner, name)
    self.addCleanup(setattr, owner, name, value)


class CheckTest(_Case):
  def test_installed_versions_are_verified_and_have_every_name(self):
    # Fails after an upgrade of CPython or grain: run tests/test_shm.py,
    # tests/test_data.py and tests/test_cli.py -k sigkill on the new
    # versions, then add them to shm.VERIFIED_* (or pin the old ones).
    with self.assertNoLogs(_LOGGER, 'WARNING'):
      shm.check_private_apis()
    self.assertEqual(shm._passed, set(shm.GROUPS))
    python = f'{sys.version_info.major}.{sys.version_info.minor}'
    self.assertIn(python, shm.VERIFIED_PYTHON)
    self.assertIn(shm._grain_version(), shm.VERIFIED_GRAIN)

  @parameterized.named_parameters(
    (
      'tracker_pid',
      resource_tracker._resource_tracker,
      '_pid',
      'multiprocessing.resource_tracker._resource_tracker._pid: missing',
    ),
    (
      'tracker_fd',
      resource_tracker._resource_tracker,
      '_fd',
      'multiprocessing.resource_tracker._resource_tracker._fd: missing',
    ),
    (
      'tracker',
      resource_tracker,
      '_resource_tracker',
      'multiprocessing.resource_tracker._resource_tracker: missing',
    ),
    (
      'interpreter_flags',
      util,
      '_args_from_interpreter_flags',
      'multiprocessing.util._args_from_interpreter_flags: missing',
    ),
    (
      'posixshmem',
      shared_memory,
      '_posixshmem',
      'multiprocessing.shared_memory._posixshmem: missing',
    ),
    (
      'use_posix',
      shared_memory,
      '_USE_POSIX',
      'multiprocessing.shared_memory._USE_POSIX: missing',
    ),
    (
      'grain_deletion_thread',
      shared_memory_array.SharedMemoryArray,
      '_del_thread_pool',
      'grain._src.python.ipc.shared_memory_array.SharedMemoryArray.'
      '_del_thread_pool: missing',
    ),
  )
  def test_a_missing_name_is_named(self, owner, name, problem):
    self.remove(owner, name)
    with self.assertRaises(shm.PrivateApiError) as raised:
      shm.check_private_apis()
    message = str(raised.exception)
    self.assertIn(problem, [line.strip() for line in message.splitlines()])
    self.assertIn('dino_jax/data/shm.py', message)
    self.assertIn('Pin a verified version', message)
    self.assertLen(message.splitlines(), 3)  # that one name, only once

  def test_a_changed_name_is_named(self):
    self.enter_context(
      mock.patch.object(resource_tracker, '_CLEANUP_FUNCS', {'semaphore': 0})
    )
    self.enter_context(
      mock.patch.object(util, '_args_from_interpreter_flags', 1)
    )
    with self.assertRaises(shm.PrivateApiError) as raised:
      shm.check_private_apis()
    lines = str(raised.exception).splitlines()
    self.assertIn(
      '  multiprocessing.resource_tracker._CLEANUP_FUNCS: not a mapping with '
      "'shared_memory' (dict)",
      lines,
    )
    self.assertIn(
      '  multiprocessing.util._args_from_interpreter_flags: not callable (int)',
      lines,
    )

  def test_grain_module_gone_is_named(self):
    self.enter_context(
      mock.patch.dict(sys.modules, {shm.GRAIN_SHARED_MEMORY: None})
    )
    with self.assertRaisesRegex(
      shm.PrivateApiError,
      r'grain\._src\.python\.ipc\.shared_memory_array: cannot be imported',
    ):
      shm.check_private_apis()
    shm.check_private_apis(['cpython'])  # the other group is fine

  def test_each_function_raises_where_it_needs_a_name(self):
    # Before: a tracker without _fd was silently started CPython's way, in
    # the program's group; a grain without the deletion pool silently skipped.
    self.remove(resource_tracker._resource_tracker, '_fd')
    with mock.patch.object(resource_tracker, 'ensure_running') as ensure:
      with self.assertRaisesRegex(shm.PrivateApiError, r'\._fd: missing'):
        shm.start_resource_tracker()
      ensure.assert_not_called()
    with self.assertRaisesRegex(shm.PrivateApiError, r'\._fd: missing'):
      shm.track_shared_memory_from_creation()
    self.remove(shared_memory_array.SharedMemoryArray, '_del_thread_pool')
    with self.assertRaisesRegex(shm.PrivateApiError, '_del_thread_pool'):
      shm.release_shared_memory()

  def test_unverified_versions_warn_once(self):
    self.enter_context(mock.patch.object(shm, 'VERIFIED_PYTHON', ('2.7',)))
    self.enter_context(mock.patch.object(shm, 'VERIFIED_GRAIN', ('0.0.1',)))
    with self.assertLogs(_LOGGER, 'WARNING') as logs:
      shm.check_private_apis()
    self.assertLen(logs.output, 2)
    self.assertIn(f'Python {shm._python_version()} is not', logs.output[0])
    self.assertIn(f'grain {shm._grain_version()} is not', logs.output[1])
    with self.assertNoLogs(_LOGGER, 'WARNING'):
      shm.check_private_apis()

  def test_workers_do_not_warn(self):
    self.enter_context(mock.patch.object(shm, 'VERIFIED_PYTHON', ('2.7',)))
    with mock.patch('multiprocessing.parent_process', return_value=object()):
      with self.assertNoLogs(_LOGGER, 'WARNING'):
        shm.check_private_apis()


class TrackedCreationTest(_Case):
  def setUp(self):
    super().setUp()
    self.calls = []
    record = lambda what: (
      lambda name, rtype: self.calls.append(
        (what, name, rtype, os.path.exists(f'/dev/shm{name}'))
      )
    )
    for what in ('register', 'unregister'):  # no tracker started here
      self.enter_context(
        mock.patch.object(resource_tracker, what, record(what))
      )
    self.enter_context(
      mock.patch.object(shared_memory, '_posixshmem', shared_memory._posixshmem)
    )
    shm.track_shared_memory_from_creation()

  def test_a_new_segment_is_registered_before_it_exists(self):
    # Breaks if CPython's SharedMemory stops calling _posixshmem.shm_open
    # through the module's global (the replacement would go unused).
    segment = shared_memory.SharedMemory(create=True, size=4096)
    self.addCleanup(segment.unlink)
    self.addCleanup(segment.close)
    name = '/' + segment.name
    self.assertTrue(os.path.exists(f'/dev/shm{name}'))
    self.assertEqual(self.calls[0], ('register', name, 'shared_memory', False))

  def test_an_existing_name_is_not_ours(self):
    other = shared_memory.SharedMemory(create=True, size=4096)
    self.addCleanup(other.unlink)
    self.addCleanup(other.close)
    self.calls.clear()
    with self.assertRaises(FileExistsError):
      shared_memory.SharedMemory(name=other.name, create=True, size=4096)
    name = '/' + other.name
    self.assertEqual(
      self.calls,
      [
        ('register', name, 'shared_memory', True),
        ('unregister', name, 'shared_memory', True),
      ],
    )


class TrackerSessionTest(absltest.TestCase):
  def test_tracker_in_a_session_of_its_own_ends_with_the_program(self):
    program = (
      'import sys; from dino_jax.data import shm; '
      'shm.start_resource_tracker(); shm.start_resource_tracker(); '
      'print("ready", flush=True); sys.stdin.readline()'
    )
    proc = subprocess.Popen(
      [sys.executable, '-c', program],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      cwd=_ROOT,
    )
    self.addCleanup(proc.wait)
    self.addCleanup(proc.kill)
    self.assertEqual(proc.stdout.readline(), 'ready\n')
    children = _children(proc.pid)
    self.assertLen(children, 1)  # started once
    tracker = children[0]
    with open(f'/proc/{tracker}/cmdline') as f:
      self.assertIn('multiprocessing.resource_tracker', f.read())
    session = int(_stat(tracker)[3])
    self.assertEqual(session, tracker)  # its own session, its leader
    self.assertNotEqual(session, os.getsid(proc.pid))
    proc.stdin.close()  # the program exits: the tracker's pipe closes
    self.assertEqual(proc.wait(timeout=30), 0)
    deadline = time.time() + 10
    while not _exited(tracker) and time.time() < deadline:
      time.sleep(0.05)
    self.assertTrue(_exited(tracker), 'the tracker outlived the program')


if __name__ == '__main__':
  absltest.main()
