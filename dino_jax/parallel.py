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
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')


def slice_index(device: jax.Device) -> int:
  """The TPU slice (ICI island) a device is in; 0 where there is one."""
  return int(getattr(device, 'slice_index', 0) or 0)


def make_mesh(
  data: int = -1,
  fsdp: int = 1,
  devices: Sequence[jax.Device] | None = None,
  slice_of: Callable[[jax.Device], int] = slice_index,
) -> Mesh:
  """A ('data', 'fsdp') mesh over ``devices``, laid out on their topology.

  Within a slice, ``mesh_utils.create_device_mesh`` places the axes on the
  physical interconnect (TPU torus coordinates; other devices in order),
  so fsdp's gathers run between neighbours. With several slices (multi-
  slice TPU, ``slice_of`` >0 on some device) the slices are stacked along
  'data': data parallelism crosses the slow data-centre network once per
  step (the gradient reduction), fsdp stays inside a slice's ICI.

  Args:
    data: devices on the data axis; -1 takes what fsdp leaves.
    fsdp: devices on the fsdp axis (at most one slice's devices).
    devices: the devices; default ``jax.devices()``.
    slice_of: a device's slice (default: its ``slice_index``).

  Raises:
    ValueError: the axes do not divide the devices or the slices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(
      f'mesh.fsdp={fsdp} does not divide the {n} devices; use a divisor of {n}'
    )
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(
      f'mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} != {n} devices;'
      ' set mesh.data=-1 to take what fsdp leaves'
    )
  groups: dict[int, list[jax.Device]] = {}
  for device in devices:
    groups.setdefault(slice_of(device), []).append(device)
  n_slices = len(groups)
  if data % n_slices:
    raise ValueError(
      f'mesh.data={data} is not a multiple of the {n_slices} slices '
      f"(mesh.fsdp={fsdp} must divide one slice's {n // n_slices} devices)"
    )
  per_slice = [
    _slice_mesh((data // n_slices, fsdp), groups[k]) for k in sorted(groups)
  ]
  return Mesh(
    np.concatenate(per_slice, axis=0),
    BATCH_AXES,
    axis_types=(AxisType.Auto,) * len(BATCH_AXES),
  )


def _slice_mesh(shape: tuple[int, int], devices: list) -> np.ndarray:
  """``devices`` (one slice) as an array of ``shape`` on their topology."""
  try:
    return mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    # A shape the torus cannot take whole (e.g. fsdp=3): split its axes.
    return mesh_utils.create_device_mesh(
      shape, devices, allow_split_physical_axes=True
    )


def constrain_batch(x: jax.Array, batch_axis: int = 0) -> jax.Array:
  """``x`` split over all devices along ``batch_axis``, inside a mesh context.

  Activations of the batch stay where their rows are: without this GSPMD may
  compute a layer whose weights are fsdp-split tensor-parallel, gathering
  the activations of all the fsdp devices instead of the weights. A no-op
  outside ``jax.sharding.use_abstract_mesh`` (``jit_train_step`` and the
  evaluation functions trace inside one) or on a mesh without the batch axes.

  Args:
    x: an activation with the batch along ``batch_axis``.
    batch_axis: the batch dimension.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(
    x, P(*([None] * batch_axis), BATCH_AXES)
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Split dimension ``batch_axis`` over all mesh devices."""
  return NamedSharding(mesh, P(*([None] * batch_axis), BATCH_AXES))


def process_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
  """The rows of a global batch that this process's devices hold, ascending.

  A process supplies exactly these rows of each global batch (in this
  order, as ``jax.make_array_from_process_local_data`` takes them), so the
  global batch is the same on any number of processes and any device
  order. One process: all rows.
  """
  indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  rows = set()
  for index in indices.values():
    rows.update(range(*index[0].indices(batch_size)))
  return np.array(sorted(rows), np.int64)


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

  def step_in_mesh(state, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return train_step(state, batch)

  return jax.jit(
    step_in_mesh,
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
