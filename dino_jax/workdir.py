"""The run directory: path checks and the one-run-per-workdir lock.

A workdir holds one run: ``checkpoints/``, ``metrics.jsonl``,
``config.json``, ``eval/``; a local directory or a URL (``gs://bucket/run``,
read and written through ``dino_jax.storage``). Two runs writing into it at
once would overwrite each other's checkpoints and double every metrics row,
so process 0 of a run holds ``WORKDIR/lock`` for as long as it trains. On a
disk that is an exclusive ``flock``: the kernel drops it when the process
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
import sys
import threading
from collections.abc import Callable

import ml_collections
from absl import flags
from ml_collections import config_flags

from dino_jax import checkpoint as checkpoint_lib
from dino_jax import cli_errors, console, storage


class WorkdirError(ValueError):
  """The workdir cannot be used; the message says why and what to do."""


def check_path(workdir: str) -> None:
  """Raises WorkdirError unless ``workdir`` is, or can become, a directory.

  A URL (``gs://bucket/run``) must name a bucket that exists and answers
  (``storage.check_reachable``: StorageError otherwise, within a bounded
  time) and must not be an object itself. Creates nothing: a run that fails
  its checks leaves no trace.
  """
  if not workdir:
    raise WorkdirError('--workdir is empty; pass a directory')
  if storage.is_remote(workdir):
    storage.check_reachable(workdir)
    if storage.as_path(workdir).is_file():
      raise WorkdirError(
        f'--workdir={workdir} is an object, not a prefix; pass a directory'
      )
    return
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
  """``os.makedirs`` with a WorkdirError instead of an OSError.

  A URL needs nothing: a prefix exists once an object is under it (and a
  local folder named ``gs:`` must never appear).
  """
  check_path(workdir)
  if storage.is_remote(workdir):
    return
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(
      f'--workdir={workdir} cannot be created: {e.strerror}; pass a '
      'directory you can write to'
    ) from e


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


# Evaluation and interop: reading a workdir, and the command-line front.

# Config groups an evaluation may override (checkpoint.EVAL_FIELDS).
EVAL_GROUPS = tuple(g.removesuffix('.*') for g in checkpoint_lib.EVAL_FIELDS)
_OVERRIDE_PREFIXES = cli_errors.OVERRIDE_PREFIXES
ConfigOverrideError = cli_errors.ConfigOverrideError


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates ``--config.a.b=c`` overrides from the other arguments.

  Args:
    argv: the command line, program name first.

  Returns:
    (the other arguments, the overrides as ``--config.a.b=c`` strings).
  """
  rest, overrides = [], []
  for arg in argv:
    (overrides if arg.startswith(_OVERRIDE_PREFIXES) else rest).append(arg)
  return rest, overrides


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: list[str]
) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``--config.a.b=c`` overrides applied.

  The values are parsed as ``python -m dino_jax.main`` parses them
  (ml_collections ``config_flags``: ints, floats, ``true``/``false``,
  tuples as ``(1, 2)``); unknown fields are refused.

  Raises:
    ConfigOverrideError: naming the override and the reason.
  """
  config = config.copy_and_resolve_references()
  if not overrides:
    return config
  values = flags.FlagValues()
  argv = ['dino_jax', *overrides]
  try:  # an unknown field fails in DEFINE, a bad value in the parse
    config_flags.DEFINE_config_dict(
      'config', config, flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigOverrideError(cli_errors.override_error(overrides, e)) from e
  return values.config


def load_config_file(
  spec: str, overrides: list[str] = ()
) -> ml_collections.ConfigDict:
  """``--config=FILE[:ARG]`` plus overrides, as ``dino_jax.main`` reads it.

  Raises:
    ConfigOverrideError: the file does not load, or an override fails.
  """
  values = flags.FlagValues()
  argv = ['dino_jax', f'--config={spec}']
  config_flags.DEFINE_config_file(
    'config', None, flag_values=values, lock_config=True, sys_argv=argv
  )
  try:
    values(argv)
    config = values.config
    config.keys()  # a file that failed to load raises here
  except Exception as e:  # noqa: BLE001 - the config file's own error
    raise ConfigOverrideError(cli_errors.config_file_error(spec, e)) from e
  return apply_overrides(config, list(overrides))


def config_from_saved(saved: dict) -> ml_collections.ConfigDict:
  """The config a checkpoint was saved with (JSON) as a typed ConfigDict.

  Starts from ``default_config()``, so that fields added since the
  checkpoint was written have their defaults and every field keeps its
  type (JSON turns tuples into lists).
  """
  from dino_jax.config import default_config

  def merge(target, values):
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(
        target.get(key), ml_collections.ConfigDict
      ):
        merge(target[key], value)
      else:
        target[key] = tuple(value) if isinstance(value, list) else value

  config = default_config()
  merge(config, saved)
  return config


def check_eval_overrides(overrides: list[str]) -> None:
  """Refuses overrides of the state's fields when reading a checkpoint."""
  for item in overrides:
    field = item.split('=', 1)[0].split('.', 1)[-1]
    if not checkpoint_lib.may_differ(field, checkpoint_lib.EVAL_FIELDS):
      raise ConfigOverrideError(
        f'{item}: the model and recipe come from the checkpoint; only '
        f'{", ".join(checkpoint_lib.EVAL_FIELDS)} may be overridden when '
        'reading a workdir'
      )


def checkpoint_dir(workdir: str) -> str:
  """``WORKDIR/checkpoints`` after checking it holds a checkpoint.

  Creates nothing.

  Raises:
    WorkdirError: the workdir or its checkpoints are missing.
    storage.StorageError: a remote workdir cannot be reached.
  """
  if not workdir:
    raise WorkdirError('--workdir is empty; pass the workdir of a run')
  storage.check_reachable(workdir)
  path = storage.join(workdir, 'checkpoints')
  if not storage.is_remote(workdir):
    if not os.path.exists(workdir):
      raise WorkdirError(
        f'--workdir={workdir} does not exist; pass the workdir of a '
        'training run (python -m dino_jax.main --workdir=...)'
      )
    if not os.path.isdir(workdir):
      raise WorkdirError(
        f'--workdir={workdir} is a file, not a directory; pass the workdir '
        'of a training run'
      )
  if not has_checkpoint(workdir):
    raise WorkdirError(
      f'--workdir={workdir} holds no checkpoint (nothing in {path}); train '
      'first (python -m dino_jax.main), or import released weights with '
      '--pretrained'
    )
  return path


IMPORT_RECORD = 'imported.json'


def write_import_record(workdir: str, source: str, step: int, what: str):
  """WORKDIR/imported.json: the .pth a workdir was seeded from, its step."""
  record = {'source': source, 'step': int(step), 'what': what}
  storage.write_text(storage.join(workdir, IMPORT_RECORD), json.dumps(record))


def imported_from(workdir: str) -> dict | None:
  """WORKDIR/imported.json ({'source', 'step', 'what'}), or None."""
  path = storage.join(workdir, IMPORT_RECORD)
  if not storage.as_path(path).exists():
    return None
  try:
    return json.loads(storage.read_text(path))
  except ValueError:
    return None


def has_checkpoint(workdir: str) -> bool:
  """Whether ``WORKDIR/checkpoints`` holds a step directory; reads only."""
  path = storage.as_path(storage.join(workdir, 'checkpoints'))
  if not storage.exists(os.fspath(path), '--workdir'):
    return False
  return any(p.name.isdigit() and p.is_dir() for p in path.iterdir())


def restore_newest(ckpt, config_for, mesh=None, abstract=None):
  """The newest intact checkpoint, laid out for its config and mesh.

  The one restore of training (``train.py``) and evaluation
  (``load_workdir``): damaged checkpoints are set aside
  (``Checkpointer.restore_newest``), a checkpoint restores under another
  mesh or device count.

  Args:
    ckpt: a ``checkpoint.Checkpointer``.
    config_for: the saved config (a dict) -> the config to restore under;
      raises ``IncompatibleCheckpointError`` for one the caller may not use
      (``checkpoint.check_compatible``).
    mesh: the mesh to lay the state out on (None: the config's).
    abstract: the state's abstract layout, if the caller has it (None:
      derived from the config, ``step.state_template``).

  Returns:
    (step, config, mesh, state), or None when there is no checkpoint.
  """
  import jax

  from dino_jax import checkpoint as checkpoint_lib
  from dino_jax import parallel
  from dino_jax import step as step_lib

  chosen = {}

  def abstract_for(saved: dict):
    config = config_for(saved)
    chosen['config'] = config
    chosen['mesh'] = (
      mesh
      if mesh is not None
      else parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    )
    if abstract is not None:
      return abstract
    _, _, init_fn = step_lib.state_template(config)
    shape = jax.eval_shape(init_fn)
    shardings = parallel.state_sharding(
      chosen['mesh'], shape, config.mesh.fsdp_min_size
    )
    return checkpoint_lib.abstract_like(shape, shardings)

  restored = ckpt.restore_newest(abstract_for)
  if restored is None:
    return None
  step, _, state = restored
  return step, chosen['config'], chosen['mesh'], state


def load_workdir(workdir: str, overrides: list[str] = ()):
  """The newest intact checkpoint of ``workdir``, ready for evaluation.

  Args:
    workdir: a training (or import) workdir.
    overrides: ``--config.a.b=c`` for the groups in EVAL_GROUPS, applied to
      the config saved with the checkpoint.

  Returns:
    (config, mesh, state, step).

  Raises:
    WorkdirError: no workdir or no checkpoint (nothing is created).
    ConfigOverrideError: a bad override.
    checkpoint.DamagedCheckpointError: no checkpoint restores.
  """
  from dino_jax import checkpoint as checkpoint_lib

  overrides = list(overrides)
  check_eval_overrides(overrides)
  ckpt = checkpoint_lib.Checkpointer(checkpoint_dir(workdir), async_save=False)
  try:
    restored = restore_newest(
      ckpt, lambda saved: apply_overrides(config_from_saved(saved), overrides)
    )
  finally:
    ckpt.close()
  if restored is None:
    raise WorkdirError(
      f'--workdir={workdir} holds no checkpoint; train first '
      '(python -m dino_jax.main)'
    )
  step, config, mesh, state = restored
  return config, mesh, state, step


def _define_distributed_flags(values: flags.FlagValues) -> None:
  """``python -m dino_jax.main``'s flags for runs without auto-detection."""
  flags.DEFINE_string(
    'coordinator_address',
    None,
    'host:port of process 0 for multi-process runs without TPU/SLURM '
    'auto-detection (with --num_processes and --process_id).',
    flag_values=values,
  )
  flags.DEFINE_integer(
    'num_processes', None, 'Processes in the run.', flag_values=values
  )
  flags.DEFINE_integer('process_id', None, 'This process.', flag_values=values)


def _run_tool(main, args, reported) -> int:
  """``main(*args)``; the exit status, after one line for an error or a
  signal.

  SIGTERM and Ctrl-C are recorded (``interrupt``): the tool stops at its
  next ``interrupt.check()`` (between batches), its outputs whole (written
  atomically), its data workers stopped.
  """
  from dino_jax import interrupt

  with interrupt.handled(announce=interrupt.STOPPING):
    try:
      main(*args)
      interrupt.check()  # a signal near the end still stops with its status
    except reported as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    except (KeyboardInterrupt, interrupt.Stopped) as e:
      if isinstance(e, interrupt.Stopped) and e.signal_name == 'SIGTERM':
        print('stopped by SIGTERM', file=sys.stderr)
        return 128 + signal.SIGTERM
      print('interrupted', file=sys.stderr)
      return 130
  return 0


def run_cli(
  define_flags: Callable[[flags.FlagValues], None],
  main: Callable[[flags.FlagValues, list[str], list[str]], None],
  argv: list[str] | None = None,
  *,
  errors: tuple[type[BaseException], ...] = (),
) -> int:
  """Runs a dino_jax tool: flags, ``--config.*`` overrides, one-line errors.

  Args:
    define_flags: defines the tool's flags on the FlagValues it is given.
    main: ``main(flag_values, positional_args, overrides)``.
    argv: the command line; None: ``sys.argv``, through ``absl.app.run``.
      Tests pass a list: the flags then live in a fresh FlagValues.
    errors: further exception types reported as ``error: <message>``
      (WorkdirError, ConfigOverrideError and the checkpoint errors always
      are).

  Returns:
    The exit status: 0, or 1 after one ``error: ...`` line on stderr.
  """
  from absl import app

  from dino_jax import checkpoint as checkpoint_lib

  values = flags.FLAGS if argv is None else flags.FlagValues()
  define_flags(values)
  _define_distributed_flags(values)
  reported = (
    WorkdirError,
    ConfigOverrideError,
    checkpoint_lib.DamagedCheckpointError,
    checkpoint_lib.IncompatibleCheckpointError,
    storage.StorageError,
    *errors,
  )

  def parse(args: list[str]) -> list[str]:
    if console.wants_help(args):
      name = console.program(main.__module__)
      console.print_help(console.tool_help(name, values))
    try:
      rest, overrides = split_overrides(args)
      return [*values(rest), *overrides]
    except (flags.Error, ConfigOverrideError) as e:
      print(f'error: {cli_errors.flag_error(e)}', file=sys.stderr)
      sys.exit(1)

  def run(args: list[str]) -> int:
    # Libraries (orbax, grain) log every step of a restore through absl.
    logging.getLogger('absl').setLevel(logging.WARNING)
    overrides = [a for a in args[1:] if a.startswith(_OVERRIDE_PREFIXES)]
    positional = [a for a in args[1:] if a not in overrides]
    from dino_jax import parallel

    # Every process of a pod or a SLURM job runs the tool; they evaluate
    # together, as in training (auto-detected, or these flags).
    console.quiet_other_processes(
      values.process_id or 0, values.num_processes or 1
    )
    parallel.initialize_distributed(
      values.coordinator_address, values.num_processes, values.process_id
    )
    import jax

    console.quiet_other_processes(jax.process_index(), jax.process_count())
    return _run_tool(main, (values, positional, overrides), reported)

  if argv is None:
    app.run(run, flags_parser=parse)
  try:
    return run(parse(argv))
  except SystemExit as e:
    return int(e.code or 0)
