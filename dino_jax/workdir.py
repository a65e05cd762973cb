"""The run directory: path checks, the checkpoint to read, its config.

A workdir holds one run: ``checkpoints/``, ``metrics.jsonl``,
``config.json``, ``eval/``; a local directory or a URL (``gs://bucket/run``,
read and written through ``dino_jax.storage``). Training checks the path
and creates it (``check_path``, ``create``) and restores its newest intact
checkpoint (``restore_newest``); evaluation reads it (``load_workdir``,
with ``--config.eval.*`` overrides of the saved config). The lock that
keeps a second run out is the shell's (``dino_jax.cli.lock``).
"""

import json
import logging
import os

import ml_collections

from dino_jax import checkpoint as checkpoint_lib
from dino_jax import overrides as overrides_lib
from dino_jax import storage

logger = logging.getLogger(__name__)

# Evaluation tools may override these config groups (checkpoint.EVAL_FIELDS).
EVAL_GROUPS = overrides_lib.EVAL_GROUPS
ConfigOverrideError = overrides_lib.ConfigOverrideError


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


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """WORKDIR/config.json (process 0): the config of the checkpoints there,
  written once a restore found them compatible."""
  import jax

  if jax.process_index() == 0:
    storage.write_text(
      storage.join(workdir, 'config.json'), config.to_json(indent=2)
    )


def restore_or_init(ckpt, config, workdir: str, mesh, built):
  """(step, state) for training: the newest intact checkpoint's, or step 0.

  Args:
    ckpt: the run's ``checkpoint.Checkpointer``.
    config: the run's config; a checkpoint must be compatible with it
      (``checkpoint.check_compatible``, else IncompatibleCheckpointError).
    workdir: the run directory (named in the errors and the log).
    mesh: the mesh the state lives on.
    built: ``step.build_sharded_step``'s result (the state's shape,
      sharding and init function).
  """
  import jax

  abstract = checkpoint_lib.abstract_like(
    built.state_shape, built.state_sharding
  )

  def config_for(saved: dict):
    checkpoint_lib.check_compatible(saved, config, workdir)
    return config

  restored = restore_newest(ckpt, config_for, mesh, abstract)
  if restored is not None:
    step, _, _, state = restored
    logger.info('resuming from step %d in %s', step, workdir)
    return step, state
  return 0, jax.jit(built.init_fn, out_shardings=built.state_sharding)()


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
  overrides = list(overrides)
  overrides_lib.check_eval_overrides(overrides)
  ckpt = checkpoint_lib.Checkpointer(checkpoint_dir(workdir), async_save=False)
  try:
    restored = restore_newest(
      ckpt,
      lambda saved: overrides_lib.apply_overrides(
        config_from_saved(saved), overrides
      ),
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
