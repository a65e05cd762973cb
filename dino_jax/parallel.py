"""Device mesh and shardings: one place for every PartitionSpec.

The mesh has axes ('data', 'fsdp'). The batch is split over both. Parameters
and optimizer moments with at least ``fsdp_min_size`` elements are split over
'fsdp' along their largest dimension that the axis divides; everything else
(and everything when fsdp = 1) is replicated. GSPMD inserts the gathers and
reduce-scatters, so every mean in the step stays a global mean.
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


def leaf_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """PartitionSpec of one state leaf (fsdp over its largest divisible dim)."""
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_sharding(
  mesh: Mesh, state_shape: Any, fsdp_min_size: int = 2**18
) -> Any:
  """Shardings of the train state (params, teacher, optimizer moments)."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(
    lambda leaf: NamedSharding(
      mesh, leaf_spec(tuple(leaf.shape), fsdp, fsdp_min_size)
    ),
    state_shape,
  )


def jit_train_step(
  train_step: Callable, mesh: Mesh, state_sh: Any, batch_shape: Any
) -> Callable:
  """jit with explicit in/out shardings and the state donated.

  Args:
    train_step: ``(state, batch) -> (state, metrics)``.
    mesh: the device mesh.
    state_sh: state shardings (``state_sharding``).
    batch_shape: a batch (or its shapes), for the batch shardings.
  """
  return jax.jit(
    train_step,
    in_shardings=(state_sh, tree_batch_sharding(mesh, batch_shape)),
    out_shardings=(state_sh, replicated(mesh)),
    donate_argnums=0,
  )


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
