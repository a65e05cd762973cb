"""Device mesh and shardings: one place for every PartitionSpec.

The mesh has axes ('data', 'fsdp'). The batch is split over both. Parameters
and optimizer moments with at least ``fsdp_min_size`` elements are split over
'fsdp' along their largest dimension that the axis divides; everything else
(and everything when fsdp = 1) is replicated. GSPMD inserts the gathers and
reductions, so every mean in the step stays a global mean; with fsdp > 1 the
student's gradients are computed per device instead
(``value_and_grad_scattered``, ``mesh.grad_reduce='scatter'``), so that the
split ones are reduce-scattered to their shards.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
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
  if (
    mesh.empty
    or not set(BATCH_AXES) <= set(mesh.axis_names)
    or _manual_batch_axes()  # inside a shard_map: the rows are local
  ):
    return x
  return jax.lax.with_sharding_constraint(
    x, P(*([None] * batch_axis), BATCH_AXES)
  )


def _manual_batch_axes() -> bool:
  """Whether this traces inside a ``shard_map`` over the batch axes."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and set(BATCH_AXES) <= set(mesh.manual_axes)


def batch_uniform(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """``jax.random.uniform(key, shape, dtype)`` for a batch-major ``shape``.

  Inside ``value_and_grad_scattered`` (a ``shard_map`` over the batch axes,
  ``shape[0]`` this device's rows) it returns this device's rows of the
  draw for the whole global batch, so a stochastic layer (drop path) draws
  the numbers the GSPMD step draws, whatever the mesh. Elsewhere it is
  exactly ``jax.random.uniform``.
  """
  if not _manual_batch_axes():
    return jax.random.uniform(key, shape, dtype)
  rows = shape[0]
  n = jax.lax.axis_size(BATCH_AXES)
  full = jax.random.uniform(key, (n * rows, *shape[1:]), dtype)
  start = jax.lax.axis_index(BATCH_AXES) * rows
  return jax.lax.dynamic_slice_in_dim(full, start, rows)


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


# A scanned ViT's blocks (model.scan_blocks): the leaves under this key hold
# the layers on axis 0 (models/vit.py stack_blocks).
STACKED_KEY = 'blocks'


def is_stacked(path: tuple) -> bool:
  """Whether the state leaf at ``path`` (a key path) holds stacked layers."""
  return any(
    str(getattr(entry, 'key', getattr(entry, 'name', entry))) == STACKED_KEY
    for entry in path
  )


def leaf_spec(
  shape: tuple[int, ...], fsdp: int, min_size: int, stacked: bool = False
) -> P:
  """PartitionSpec of one state leaf (fsdp over its largest divisible dim).

  ``stacked``: axis 0 holds layers (a scanned ViT's blocks): never split,
  and each layer's size decides, so a leaf is split as each unrolled
  block's would be.
  """
  first = 1 if stacked else 0
  if fsdp <= 1 or int(np.prod(shape[first:], dtype=np.int64)) < min_size:
    return P()
  for dim in sorted(range(first, len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_sharding(
  mesh: Mesh, state_shape: Any, fsdp_min_size: int = 2**18
) -> Any:
  """Shardings of the train state (params, teacher, optimizer moments)."""
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec),
    tree_specs(state_shape, mesh.shape['fsdp'], fsdp_min_size),
  )


def tree_specs(tree: Any, fsdp: int, min_size: int) -> Any:
  """``leaf_spec`` of every leaf of a state (or parameter) tree."""
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: leaf_spec(
      tuple(leaf.shape), fsdp, min_size, is_stacked(path)
    ),
    tree,
  )


def value_and_grad_scattered(
  fn: Callable,
  params: Any,
  batched: Any,
  replicated: Any,
  fsdp_min_size: int = 2**18,
  compute_dtype: Any = None,
) -> tuple[jax.Array, Any, Any]:
  """``jax.value_and_grad(fn, has_aux=True)`` with FSDP's own reduction.

  Under GSPMD the gradient of an fsdp-split parameter is all-reduced at
  full size and then sliced to its shards (XLA:CPU always; libtpu fuses
  only some of them into reduce-scatters: docs/bytes.md). Here ``fn`` runs
  on each device's rows, in a ``shard_map`` over the current abstract mesh
  (``jit_train_step`` traces inside one): each split parameter is
  all-gathered, and its gradient reduce-scattered over 'fsdp' straight to
  the device's shard, then summed over 'data' at the shard's size (JAX's
  transposes of ``all_gather`` and of ``pcast`` to varying). Unsplit
  parameters' gradients are all-reduced over both axes.

  With a ``compute_dtype`` narrower than a split parameter (bf16 compute,
  float32 parameters) the shard is cast to it before the gather and the
  gradient is reduced in it (``_gather_in``), as GSPMD gathers the bf16
  operand of a matmul and reduces the bf16 gradient of its weight: half
  the bytes of both collectives; the gradient is cast back to float32 on
  its shard, and the optimizer's master weights stay float32.

  Args:
    fn: ``fn(params, batched, replicated) -> (loss, (means, other))``, on
      one device's rows. ``loss`` and every leaf of ``means`` are means over
      those rows (all devices hold as many, so the mean of the devices'
      means is the global mean); ``other`` must be the same on every device
      (BatchNorm statistics averaged with ``axis_name=BATCH_AXES``).
    params: the parameters, sharded as ``state_sharding`` shards them.
    batched: arrays ``[V, B, ...]`` whose axis 1, the batch, is split over
      the batch axes.
    replicated: everything else ``fn`` reads; the same on every device.
    fsdp_min_size: as in ``state_sharding``.
    compute_dtype: the dtype the model computes in (``model.dtype``); None
      or float32: split parameters are gathered as they are.

  Returns:
    ``(loss, (means, other), grads)``: the global means, ``other``, and the
    gradient of the global mean loss, each leaf sharded as its parameter.
  """
  mesh = jax.sharding.get_abstract_mesh()
  specs = tree_specs(params, mesh.shape['fsdp'], fsdp_min_size)

  def narrowed(leaf) -> bool:  # gathered and reduced in compute_dtype
    return (
      compute_dtype is not None
      and jnp.issubdtype(leaf.dtype, jnp.floating)
      and jnp.dtype(compute_dtype).itemsize < leaf.dtype.itemsize
    )

  def gather(shard, spec):
    if 'fsdp' not in spec:
      return shard
    axis = tuple(spec).index('fsdp')
    if narrowed(shard):
      over_data = mesh.shape['data'] > 1
      return _gather_in(compute_dtype, axis, over_data)(shard)
    return jax.lax.all_gather(shard, 'fsdp', axis=axis, tiled=True)

  def reduce(grad, spec):
    # A split leaf's gradient is already its shard, summed over 'fsdp' by
    # the transpose of the gather (a reduce-scatter); a narrowed one also
    # over 'data' (_gather_in).
    if 'fsdp' not in spec:
      return jax.lax.psum(grad, BATCH_AXES)
    if narrowed(grad) or mesh.shape['data'] == 1:
      return grad
    return jax.lax.psum(grad, 'data')

  def objective(shards, batched, replicated):
    loss, aux = fn(jax.tree.map(gather, shards, specs), batched, replicated)
    # This device's share of the global mean: the reductions below sum it.
    return loss / jax.lax.axis_size(BATCH_AXES), aux

  def local(shards, batched, replicated):
    (loss, (means, other)), grads = jax.value_and_grad(objective, has_aux=True)(
      shards, batched, replicated
    )
    mean = functools.partial(jax.lax.pmean, axis_name=BATCH_AXES)
    loss = jax.lax.psum(loss, BATCH_AXES)
    grads = jax.tree.map(reduce, grads, specs)
    return loss, (jax.tree.map(mean, means), other), grads

  # Unchecked (check_vma=False): the reductions are the explicit ones above,
  # and the models' custom_vjp rules need not track varying axes. The
  # BatchNorms' pmean (axis_name) transposes to the sum of the devices'
  # cotangents, as a global mean's gradient needs.
  return jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(specs, P(None, BATCH_AXES), P()),
    out_specs=(P(), P(), specs),
    check_vma=False,
  )(params, batched, replicated)


def _gather_in(dtype: Any, axis: int, over_data: bool) -> Callable:
  """A shard's all-gather over 'fsdp' in ``dtype``, and its transpose.

  Forward: the shard cast to ``dtype``, gathered along ``axis``, cast back
  to its own dtype (so the model's cast of it to ``dtype`` is exact).
  Backward: the cotangent (the parameter's: its uses summed in float32)
  cast to ``dtype``, reduce-scattered over 'fsdp' to the shard and, with
  ``over_data``, summed over 'data', in ``dtype``; then cast back.

  Args:
    dtype: the compute dtype the collectives run in.
    axis: the shard's split dimension.
    over_data: also sum the gradient over the 'data' axis.
  """

  @jax.custom_vjp
  def gather(shard):
    full = jax.lax.all_gather(
      shard.astype(dtype), 'fsdp', axis=axis, tiled=True
    )
    return full.astype(shard.dtype)

  def forward(shard):
    return gather(shard), jnp.zeros((), shard.dtype)

  def backward(like, grad):
    grad = jax.lax.psum_scatter(
      grad.astype(dtype), 'fsdp', scatter_dimension=axis, tiled=True
    )
    if over_data:
      grad = jax.lax.psum(grad, 'data')
    return (grad.astype(like.dtype),)

  gather.defvjp(forward, backward)
  return gather


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
