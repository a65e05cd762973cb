"""Orbax checkpoints: train state + grain iterator + config, async and atomic.

Each step directory holds three items: ``state`` (the TrainState pytree),
``iter`` (each process's grain iterator state) and ``config`` (JSON). Orbax
writes to a temporary directory and renames it when complete, so a run
killed mid-save resumes from the previous checkpoint.
"""

import json
import logging
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

# Config groups that change the shape or meaning of the saved state.
_STATE_DEFINING = ('model',)


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a checkpoint of a different model."""


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
        'iter': grain.checkpoint.CheckpointHandler(),
        'config': ocp.JsonCheckpointHandler(),
      },
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, config) -> None:
    """Saves asynchronously; ``data_iter`` None saves no iterator state."""
    items = {
      'state': ocp.args.StandardSave(state),
      'config': ocp.args.JsonSave(json.loads(config.to_json())),
    }
    if data_iter is not None:
      items['iter'] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def has_iterator(self, step: int) -> bool:
    """False for a checkpoint written without data position (an import)."""
    return os.path.isdir(os.path.join(self.directory, str(step), 'iter'))

  def saved_config(self, step: int) -> dict:
    restored = self.manager.restore(
      step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
    )
    return restored['config']

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores the state (laid out as ``abstract_state``) and the iterator.

    Args:
      step: the step to restore.
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings; the
        checkpoint may have been written under another mesh.
      data_iter: grain iterator restored in place (None: state only).

    Returns:
      The restored state.
    """
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None and self.has_iterator(step):
      items['iter'] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state']

  def reached_preemption(self, step: int) -> bool:
    """True when a TPU/cluster preemption notice reached all hosts."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def check_compatible(
  saved: dict, config: ml_collections.ConfigDict, directory: str
) -> None:
  """Raises if the saved config defines a different state than ``config``."""
  current = json.loads(config.to_json())
  diffs = []
  for group in _STATE_DEFINING:
    old, new = saved.get(group, {}), current.get(group, {})
    for key in sorted(set(old) | set(new)):
      if old.get(key) != new.get(key):
        diffs.append(
          f'{group}.{key}: checkpoint {old.get(key)!r}, config {new.get(key)!r}'
        )
  if diffs:
    raise IncompatibleCheckpointError(
      f'{directory} holds a checkpoint of a different model:\n  '
      + '\n  '.join(diffs)
      + '\nUse another --workdir, or the same model settings to resume.'
    )


def abstract_like(state_shape, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restore."""
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    state_shape,
    shardings,
  )
