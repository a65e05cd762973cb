"""Sharded feature extraction shared by the k-NN, linear and attention evals.

Eval preprocessing (SPEC §7.1): resize the shorter side to ``resize_size``
(bicubic), centre-crop ``crop_size``, ImageNet normalization.

Each feature kind (CLS, linear-probe tokens, CLS attention, raw pixels) is
one cached jitted function of ``(params, images)`` (``jit_feature_fn``):
the same executable for every checkpoint, on any number of processes. Every
process feeds its share of each batch; images and their labels, valid flags
and source indices become global arrays of one sharding and are gathered
together (``gather``), so no row can lose its label.
"""

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from PIL import Image

from dino_jax import interrupt, parallel
from dino_jax.data import multicrop, pipeline

logger = logging.getLogger(__name__)


class EvalTransform(grain.transforms.Map):
  """Record -> {image float32 [S, S, 3] normalized, label, valid, index}.

  ``index`` is the record's ``index`` field (its position in the source,
  -1 if absent); an undecodable record gets ``valid=False``.
  """

  def __init__(self, resize_size: int, crop_size: int):
    self.resize_size, self.crop_size = resize_size, crop_size
    self._decoder = pipeline.CanvasDecoder(1 << 30)  # decode only, no canvas

  def map(self, record):
    s = self.crop_size
    out = {
      'label': np.int32(record.get('label', -1)),
      'index': np.int32(record.get('index', -1)),
    }
    try:
      image = self._decoder._to_pil(record).convert('RGB')
    except Exception:  # noqa: BLE001 - reported by extract, by path
      return {**out, 'image': np.zeros((s, s, 3), np.float32), 'valid': False}
    w, h = image.size
    if min(h, w) != self.resize_size:
      scale = self.resize_size / min(h, w)
      image = image.resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC
      )
    w, h = image.size
    top, left = round((h - s) / 2), round((w - s) / 2)
    image = image.crop((left, top, left + s, top + s))
    x = (np.asarray(image, np.float32) / 255.0 - np.array(multicrop.MEAN)) / (
      np.array(multicrop.STD)
    )
    return {**out, 'image': x.astype(np.float32), 'valid': True}


class _Indexed:
  """A source whose records also carry their position (``index``)."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    return {**self.source[i], 'index': i}


def eval_dataset(
  source,
  *,
  local_batch: int,
  resize_size: int,
  crop_size: int,
  max_images: int = -1,
  num_workers: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> tuple[grain.IterDataset, int]:
  """This process's batches of the first ``max_images`` images, in order.

  Batches are formed on the random-access dataset, before the workers: each
  element a worker computes is a whole batch, so batch i holds the same
  images (the process's slice, positions ``i * local_batch ...``) whatever
  ``num_workers`` is. The last batch may be smaller.

  Returns:
    (dataset of dicts image [b, S, S, 3], label [b], valid [b], index [b];
    number of batches).
  """
  n = len(source) if max_images < 0 else min(max_images, len(source))
  ds = grain.MapDataset.source(_Indexed(source))[:n]
  ds = ds[process_index::process_count]
  ds = ds.map(EvalTransform(resize_size, crop_size))
  ds = ds.batch(local_batch, drop_remainder=False)
  n_batches = len(ds)
  return pipeline.read(ds, num_workers), n_batches


def _private(batch: dict) -> dict:
  """``batch`` copied out of grain's shared memory into this process's.

  A worker's batch arrives in shared memory segments, unlinked when the
  last array using them is deleted. Kept (as the label rows are, until the
  end) or deleted late, they outlive the deletion thread at exit and are
  reported leaked; copied, each batch's segments go at the next batch.
  """
  return {k: np.array(v) for k, v in batch.items()}


def _pad(batch: dict, size: int) -> dict:
  n = len(batch['label'])
  if n == size:
    return batch
  fill = {'label': -1, 'index': -1}
  return {
    k: np.concatenate(
      [v, np.full((size - n, *v.shape[1:]), fill.get(k, 0), v.dtype)]
    )
    for k, v in batch.items()
  }


def report_undecodable(source, indices, show: int = 5) -> str | None:
  """Logs one warning naming the undecodable records; returns it.

  Args:
    source: the source the indices refer to.
    indices: distinct source positions of the records that failed to decode.
    show: how many to name (path and reason).

  Returns:
    The message, or None when ``indices`` is empty.
  """
  indices = sorted(int(i) for i in indices)
  if not indices:
    return None
  named = []
  for i in indices[:show]:
    record = source[i]
    reason = pipeline.CanvasDecoder(1).map(record).get('error', '?')
    named.append(f'{pipeline.describe(record)} ({reason})')
  more = f', and {len(indices) - show} more' if len(indices) > show else ''
  message = (
    f'skipped {len(indices)} undecodable images: {", ".join(named)}{more}'
  )
  logger.warning('%s', message)
  return message


def variables_of(params) -> dict:
  """``{'params': params}``, or ``params`` itself when it already holds the
  variables with BatchNorm running statistics (``{'params',
  'batch_stats'}``, a ResNet: ``step.teacher_backbone``), so a ResNet runs
  in inference mode on its running statistics."""
  if isinstance(params, Mapping) and 'batch_stats' in params:
    return params
  return {'params': params}


def cls_features(model, params, images: jax.Array) -> jax.Array:
  """[B, S, S, 3] -> [B, D]: backbone CLS after the final norm (SPEC §7.1);
  a ResNet's pooled features (inference mode)."""
  return model.apply(variables_of(params), images).astype(jnp.float32)


def probe_features(
  model,
  params,
  images: jax.Array,
  n_last_blocks: int = 4,
  avgpool: bool = False,
) -> jax.Array:
  """[B, S, S, 3] -> [B, F] linear-probe features (SPEC §7.2).

  The CLS tokens of the last ``n_last_blocks`` blocks (each after the final
  norm) concatenated, F = n * D; with ``avgpool`` (n = 1) the CLS and the
  mean patch token interleaved element-wise, F = 2 * D. A ResNet has no
  blocks of tokens: its pooled features (official eval_linear.py).
  """
  if not hasattr(model, 'intermediate_layers'):
    return jax.lax.stop_gradient(cls_features(model, params, images))
  layers = model.apply(
    {'params': params}, images, n=n_last_blocks, method='intermediate_layers'
  )
  feats = jnp.concatenate([x[:, 0] for x in layers], axis=-1)
  if avgpool:
    if n_last_blocks != 1:
      raise ValueError('avgpool needs n_last_blocks=1 (official code)')
    mean_patch = jnp.mean(layers[-1][:, 1:], axis=1)
    # cat on a new last axis, then flatten: cls_0, avg_0, cls_1, avg_1, ...
    feats = jnp.stack([feats, mean_patch], axis=-1).reshape(feats.shape[0], -1)
  return jax.lax.stop_gradient(feats.astype(jnp.float32))


def attention_features(model, params, images: jax.Array) -> jax.Array:
  """[B, H, W, 3] -> [B, heads, N]: the last block's CLS -> patch attention.

  H and W are multiples of the patch size p; N = (H / p) * (W / p) patches
  in row-major order (SPEC §7.3).
  """
  attn = model.apply(
    {'params': params}, images, method='last_self_attention'
  )  # [B, heads, 1 + N, 1 + N]
  return attn[:, :, 0, 1:].astype(jnp.float32)


def pixel_features(model, params, images: jax.Array) -> jax.Array:
  """[B, S, S, 3] -> [B, S * S * 3]: the raw-pixel baseline (no model)."""
  del model, params
  return images.reshape(images.shape[0], -1)


FEATURE_KINDS = {
  'cls': cls_features,
  'probe': probe_features,
  'attention': attention_features,
  'pixels': pixel_features,
}


@functools.lru_cache(maxsize=64)
def jit_feature_fn(
  model: nn.Module | None,
  mesh: Mesh | None = None,
  kind: str = 'cls',
  **options,
) -> Callable[[Any, jax.Array], jax.Array]:
  """The jitted ``features(params, images)`` of one feature kind; cached.

  One function (and so one compile per parameter and image shape) per
  ``(model, mesh, kind, options)``: the parameters are arguments, never
  constants, so the trained teacher, a random init or the next checkpoint
  reuse the same executable, and parameters spanning other processes'
  devices are accepted. ``dino_jax.aot`` lowers it ahead of time:
  ``jit_feature_fn(model, mesh).lower(params_shapes, images_shape)``.

  Signature of the returned function: ``features(params, images)``:

  - ``params``: the model's parameter tree (``{'params': ...}`` inner dict;
    ignored by 'pixels'), in any sharding over ``mesh``: the jitted function
    takes the arguments' own (fsdp-split or replicated);
  - ``images``: float32 ``[B, H, W, 3]`` normalized, B a multiple of the
    mesh's device count, split over the batch axes ('data', 'fsdp');
  - returns float32 ``[B, F]`` ('attention': ``[B, heads, N]``) split over
    the batch axes: row i belongs to image i.

  The body is traced inside ``jax.sharding.use_abstract_mesh``, so the
  model's ``parallel.constrain_batch`` keeps activations on their rows.

  Args:
    model: the ViT backbone module (hashable; None for 'pixels').
    mesh: the device mesh; None: no shardings (one device, local arrays).
    kind: one of FEATURE_KINDS: 'cls' (k-NN), 'probe' (linear probe;
      options ``n_last_blocks``, ``avgpool``), 'attention', 'pixels'.
    **options: keyword arguments of the kind's function (hashable).

  Returns:
    A ``jax.jit``-wrapped function (``.lower``, ``._cache_size`` work).

  Raises:
    ValueError: an unknown kind (the valid ones are listed).
  """
  if kind not in FEATURE_KINDS:
    raise ValueError(
      f'unknown feature kind {kind!r}; use one of {sorted(FEATURE_KINDS)}'
    )
  fn = functools.partial(FEATURE_KINDS[kind], model, **options)
  if mesh is None:
    return jax.jit(fn)

  def features(params, images):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return parallel.constrain_batch(
        fn(params, parallel.constrain_batch(images))
      )

  batch = parallel.batch_sharding(mesh)
  # None: the parameters keep the sharding they come with.
  return jax.jit(features, in_shardings=(None, batch), out_shardings=batch)


@functools.lru_cache(maxsize=8)
def _replicate_fn(mesh: Mesh):
  return jax.jit(lambda tree: tree, out_shardings=parallel.replicated(mesh))


def gather(mesh: Mesh, tree: Any) -> Any:
  """Every row of each global array of ``tree``, on every process, as numpy.

  All leaves are gathered by the same program, so rows that share a
  position in their global arrays (an image's features, label and index)
  share it in the result, whatever the order of the devices and processes.
  """
  replicated = _replicate_fn(mesh)(tree)
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), replicated)


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Host numpy arrays, equal on every process -> replicated global arrays."""
  sharding = parallel.replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree.map(put, tree)


def extract(
  feature_fn: Callable[[jax.Array], Any],
  source,
  *,
  mesh: Mesh,
  batch_size: int,
  resize_size: int,
  crop_size: int,
  max_images: int = -1,
  num_workers: int = 0,
  log_every: int = 50,
) -> tuple[Any, np.ndarray]:
  """Features and labels of every image of a source, once, in source order.

  The result is the same for any ``num_workers``, batch size, process count
  and device order. Each process feeds its share of a batch; the images,
  labels, valid flags and source indices of the batch become global arrays
  with the same sharding, and are gathered with the features by one call:
  a row's label can only be its image's. Undecodable images are dropped and
  named in one warning.

  Args:
    feature_fn: ``images [B, S, S, 3] -> features [B, F]`` (or a dict of
      such) on global arrays split over ``mesh``'s batch axes, e.g.
      ``functools.partial(jit_feature_fn(model, mesh), params)``.
    source: random-access source.
    mesh: device mesh; each global batch is split over its devices.
    batch_size: global batch size (a multiple of the device count).
    resize_size: shorter-side resize.
    crop_size: centre crop.
    max_images: use the first ``max_images`` images (-1: all).
    num_workers: grain decode threads (``pipeline.read``).
    log_every: progress line every this many batches.

  Returns:
    (features float32 [N, F] (or a dict of them), labels int32 [N]),
    the same on every process, N = the number of decodable images among the
    first ``max_images``.
  """
  count, index = jax.process_count(), jax.process_index()
  local_batch = batch_size // count
  ds, n_batches = eval_dataset(
    source,
    local_batch=local_batch,
    resize_size=resize_size,
    crop_size=crop_size,
    max_images=max_images,
    num_workers=num_workers,
    process_index=index,
    process_count=count,
  )
  # Every process runs the same number of steps (pads with invalid rows).
  if count > 1:
    n_batches = int(
      multihost_utils.process_allgather(np.int32(n_batches)).max()
    )
  rows = []
  # Read on a thread: a signal stops the wait (interrupt.check), and the
  # evaluation stops between batches.
  reader = interrupt.Reader(iter(ds))
  empty = {
    'image': np.zeros((0, crop_size, crop_size, 3), np.float32),
    'label': np.zeros((0,), np.int32),
    'index': np.zeros((0,), np.int32),
    'valid': np.zeros((0,), bool),
  }
  try:
    for i in range(n_batches):
      try:
        local = reader.next()
      except StopIteration:  # this process's share ended: padding rows
        local = empty
      batch = pipeline.global_batch(mesh, _pad(_private(local), local_batch))
      images = batch.pop('image')
      rows.append(gather(mesh, {**batch, 'features': feature_fn(images)}))
      if log_every and (i + 1) % log_every == 0:
        logger.info('features: batch %d/%d', i + 1, n_batches)
  finally:
    reader.close()  # stops grain's decode threads
    reader = local = None  # with their buffers
  rows = jax.tree.map(lambda *xs: np.concatenate(xs), *rows)
  index_all, valid_all = rows['index'], rows['valid'].astype(bool)
  real = index_all >= 0  # padding rows carry index -1
  report_undecodable(source, index_all[real & ~valid_all])
  keep = np.flatnonzero(real & valid_all)
  keep = keep[np.argsort(index_all[keep], kind='stable')]  # source order
  feats = jax.tree.map(
    lambda x: np.asarray(x[keep], np.float32), rows['features']
  )
  return feats, rows['label'][keep].astype(np.int32)
