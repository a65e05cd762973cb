"""Orbax checkpoints: train state + config, async and atomic; fallback.

Each step directory holds two items: ``state`` (the TrainState pytree) and
``config`` (JSON). The data position needs no item of its own: batch k of
the pipeline is fixed by the config, and a run resumes at batch
``state.step`` (``pipeline.train_dataset(start_batch=...)``). Orbax
writes to a temporary directory and renames it when complete, so a run
killed mid-save resumes from the previous checkpoint. A checkpoint damaged
later (truncated files, a missing item) is skipped on restore, moved to
``WORKDIR/damaged_checkpoints/`` and never deleted. The directory may be a
URL (``gs://bucket/run/checkpoints``): Orbax writes through TensorStore,
the move goes through ``dino_jax.storage``.
"""

import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from dino_jax import storage

logger = logging.getLogger(__name__)

# The contract between a checkpoint and the config that reads it: a field
# ('data.path') or a group ('eval.*') per entry. README lists both tuples
# ("Resuming", "Evaluating"); tests/test_checkpoint.py keeps them equal.
#
# Fields that may differ between the run that saved a checkpoint and the run
# that resumes it: they change neither the state, the data order nor the
# schedules. Any other difference is refused (check_compatible).
RESUMABLE_FIELDS = (
  'total_steps',
  'log_every_steps',
  'checkpoint_every_steps',
  'keep_checkpoints',
  'eval_every_steps',
  'eval.*',
  'linear.*',
  'data.num_workers',
  'data.path',
  'data.synthetic_delay',
  'mesh.*',
)
# Fields an evaluation of a workdir may override; the others describe the
# state in the checkpoint and come from it (workdir.check_eval_overrides).
EVAL_FIELDS = ('eval.*', 'linear.*', 'data.*', 'mesh.*')


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a different model or recipe."""


class DamagedCheckpointError(RuntimeError):
  """Every checkpoint in the workdir failed to restore."""


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` for the DINO run."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = directory
    self.manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
      ),
      item_handlers={
        'state': ocp.StandardCheckpointHandler(),
        'config': ocp.JsonCheckpointHandler(),
      },
    )

  def restore_newest(
    self,
    abstract_for: Callable[[dict], Any],
  ) -> tuple[int, dict, Any] | None:
    """Restores the newest intact checkpoint; None when there is none.

    Checkpoints that fail to read (truncated or missing files) are logged
    with the reason, moved to ``<workdir>/damaged_checkpoints/STEP`` by
    process 0, and the next older one is tried.

    Args:
      abstract_for: saved config (dict) -> abstract state with shardings
        (``abstract_like``); may raise IncompatibleCheckpointError, which
        propagates (a checkpoint of another recipe is not damaged).

    Returns:
      (step, saved config, state), or None for a workdir with no checkpoint.

    Raises:
      DamagedCheckpointError: checkpoints exist but none restores.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    damaged = []
    _quiet_failed_reads()
    for step in steps:
      try:
        saved = self.saved_config(step)
      except Exception as e:  # noqa: BLE001 - any read failure is damage
        damaged.append((step, e))
        continue
      abstract = abstract_for(saved)
      try:
        state = self.restore(step, abstract)
      except Exception as e:  # noqa: BLE001
        gc.collect()  # abandoned read coroutines report now, to the hooks
        damaged.append((step, e))
        continue
      self._set_aside(damaged)
      return step, saved, state
    if damaged:
      raise DamagedCheckpointError(
        f'no checkpoint in {self.directory} restores: '
        + '; '.join(f'step {s}: {_reason(e)}' for s, e in damaged)
        + '. Check the files, or pass a new --workdir.'
      )
    return None

  def _set_aside(self, damaged: list) -> None:
    """Logs each damaged step and moves it out of the manager's reach."""
    if not damaged:
      return
    directory = storage.as_path(self.directory)
    if not storage.is_remote(self.directory):
      directory = directory.absolute()
    target_root = directory.parent / 'damaged_checkpoints'
    for step, error in damaged:
      target = target_root / str(step)
      if target.exists():
        target = target.with_name(f'{step}.{time.strftime("%Y%m%d-%H%M%S")}')
      logger.warning(
        'checkpoint %d in %s is damaged (%s); skipped it and moved it to %s',
        step,
        self.directory,
        _reason(error),
        target,
      )
      if jax.process_index() == 0:
        # A prefix on object storage cannot be renamed: copied, then deleted.
        storage.move_tree(os.fspath(directory / str(step)), os.fspath(target))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices('dino_jax damaged checkpoints')
    self.manager.reload()

  def save(self, step: int, state, config) -> None:
    """Saves asynchronously (atomic: a temporary directory is renamed)."""
    items = {
      'state': ocp.args.StandardSave(state),
      'config': ocp.args.JsonSave(json.loads(config.to_json())),
    }
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def saved_config(self, step: int) -> dict:
    restored = self.manager.restore(
      step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
    )
    return restored['config']

  def restore(self, step: int, abstract_state):
    """Restores the state laid out as ``abstract_state``.

    Args:
      step: the step to restore.
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings; the
        checkpoint may have been written under another mesh.

    Returns:
      The restored state.
    """
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state']

  def wait(self, poll: Callable[[], None] | None = None) -> None:
    """Waits for a save in flight; calls ``poll`` every 0.1 s meanwhile
    (it may raise to stop waiting: a second Ctrl-C)."""
    if poll is not None:
      while self.manager.is_saving_in_progress():
        poll()
        time.sleep(0.1)
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _quiet_failed_reads() -> None:
  """Keeps the fallout of a failed Orbax read off stderr.

  When one array of a checkpoint fails to read, Orbax's restore raises at
  once and closes its event loop while TensorStore still finishes the other
  reads: each of those reports 'Event loop is closed', each abandoned read
  coroutine its own copy of the error (unraisable exceptions), and asyncio
  logs 'Task exception was never retrieved' for each abandoned task: about
  150 tracebacks for the tiny test model, some during the restore, some
  seconds after it. The caller logs the failure itself in one line; these
  hooks send only that fallout to the debug log, for the rest of the
  process, and pass every other unraisable exception and log record on.
  Idempotent.
  """
  if getattr(sys.unraisablehook, '_dino_jax_quiet', False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    code = getattr(unraisable.object, 'cr_code', None)
    closed = 'Event loop is closed' in str(error)
    orbax = code is not None and 'orbax' in code.co_filename
    if closed or orbax or _orbax_traceback((None, error, None)):
      logger.debug('after a failed restore: %s', _reason(error))
      return
    previous(unraisable)

  hook._dino_jax_quiet = True
  sys.unraisablehook = hook

  def abandoned_task(record: logging.LogRecord) -> bool:
    # asyncio's 'Task exception was never retrieved', and the same for the
    # '_GatheringFuture' that gathers the reads, whose message names only
    # the failed TensorStore read: told apart by Orbax's frames in the
    # traceback.
    message = record.getMessage()
    if 'exception was never retrieved' not in message.split('\n')[0]:
      return True
    if 'orbax' in message or _orbax_traceback(record.exc_info):
      logger.debug('after a failed restore: %s', message.split('\n')[0])
      return False
    return True

  logging.getLogger('asyncio').addFilter(abandoned_task)


def _orbax_traceback(exc_info) -> bool:
  """Whether an exception's traceback (or its cause's) passes through Orbax."""
  error = exc_info[1] if isinstance(exc_info, tuple) else None
  seen = 0
  while error is not None and seen < 8:
    frame = error.__traceback__
    while frame is not None:
      if 'orbax' in frame.tb_frame.f_code.co_filename:
        return True
      frame = frame.tb_next
    error = error.__cause__ or error.__context__
    seen += 1
  return False


def _reason(error: Exception) -> str:
  text = ' '.join(str(error).split()) or type(error).__name__
  return f'{type(error).__name__}: {text[:200]}'


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def may_differ(field: str, patterns: tuple[str, ...]) -> bool:
  """Whether ``field`` ('eval.ks') is one of ``patterns`` ('eval.*')."""
  return any(
    field == rule or (rule.endswith('.*') and field.startswith(rule[:-1]))
    for rule in patterns
  )


def check_compatible(
  saved: dict, config: ml_collections.ConfigDict, directory: str
) -> None:
  """Raises unless ``config`` may resume a checkpoint saved with ``saved``.

  Only the fields in RESUMABLE_FIELDS may differ; every other difference
  would change the state, the data order or the schedules.
  """
  from dino_jax.config import default_config  # no cycle: config is a leaf

  old, new = _flatten(saved), _flatten(json.loads(config.to_json()))
  defaults = _flatten(json.loads(default_config().to_json()))
  diffs = []
  for field in sorted(set(old) | set(new)):
    # A field added after the checkpoint was written had its default then.
    a, b = old.get(field, defaults.get(field)), new.get(field)
    if isinstance(a, list) or isinstance(b, list):  # JSON has no tuples
      a = list(a) if isinstance(a, (list, tuple)) else a
      b = list(b) if isinstance(b, (list, tuple)) else b
    if a != b and not may_differ(field, RESUMABLE_FIELDS):
      diffs.append(f'{field} (checkpoint {a!r}, now {b!r})')
  if diffs:
    raise IncompatibleCheckpointError(
      f'{directory} holds a checkpoint of another recipe: '
      + ', '.join(diffs)
      + '. Resume with the same values, or pass a new --workdir.'
    )


def abstract_like(state_shape, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restore."""
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    state_shape,
    shardings,
  )
