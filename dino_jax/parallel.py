"""Device mesh and shardings: one place for every PartitionSpec.

The mesh has axes ('data', 'fsdp'); the batch is split over both, parameters
are replicated (fsdp rules come with the scale-out work, issue 9).
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')


def make_mesh(
  data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A ('data', 'fsdp') mesh over ``devices`` (default: all devices).

  Args:
    data: devices on the data axis; -1 takes what fsdp leaves.
    fsdp: devices on the fsdp axis.
    devices: the devices; default ``jax.devices()``.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1:
    if n % fsdp:
      raise ValueError(f'mesh.fsdp={fsdp} does not divide the {n} devices')
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(
      f'mesh data={data} x fsdp={fsdp} = {data * fsdp} != {n} devices'
    )
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Split dimension ``batch_axis`` over all mesh devices."""
  return NamedSharding(mesh, P(*([None] * batch_axis), BATCH_AXES))


def tree_batch_sharding(mesh: Mesh, batch: Any) -> Any:
  """Per-leaf batch shardings: crops [V, B, ...] split B, others split dim 0."""

  def spec(path, leaf):
    name = str(getattr(path[-1], 'key', ''))
    axis = 1 if name.endswith('_crops') else 0
    return batch_sharding(mesh, axis)

  return jax.tree_util.tree_map_with_path(spec, batch)


def state_sharding(mesh: Mesh, state_shape: Any) -> Any:
  """Shardings of the train state: replicated for now."""
  return jax.tree.map(lambda _: replicated(mesh), state_shape)


def jit_train_step(
  train_step: Callable, mesh: Mesh, state_shape: Any, batch_shape: Any
) -> Callable:
  """jit with explicit in/out shardings and the state donated."""
  state_sh = state_sharding(mesh, state_shape)
  return jax.jit(
    train_step,
    in_shardings=(state_sh, tree_batch_sharding(mesh, batch_shape)),
    out_shardings=(state_sh, replicated(mesh)),
    donate_argnums=0,
  )


def jit_init(init_fn: Callable, mesh: Mesh) -> Callable:
  """jit an init so the state is created already laid out on the mesh."""
  shape = jax.eval_shape(init_fn)
  return jax.jit(init_fn, out_shardings=state_sharding(mesh, shape))


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """``jax.distributed.initialize`` when the run spans several processes.

  Explicit coordinator flags win; otherwise JAX auto-detects Cloud TPU pods
  and SLURM. A single process on one machine needs nothing.
  """
  import os

  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif (
    'SLURM_JOB_ID' in os.environ
    and int(os.environ.get('SLURM_NTASKS', '1')) > 1
  ):
    jax.distributed.initialize()
  elif os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0:
    jax.distributed.initialize()
