"""Sharded feature extraction shared by the k-NN and linear evaluations.

Eval preprocessing (SPEC §7.1): resize the shorter side to ``resize_size``
(bicubic), centre-crop ``crop_size``, ImageNet normalization.
"""

import logging
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from dino_jax import parallel
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
  # A few batches decoded ahead on threads; grain's default read-ahead of 500
  # elements would be 500 batches here.
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
  )
  return pipeline.prefetch(ds, num_workers), n_batches


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


def extract(
  feature_fn: Callable[[jax.Array], jax.Array],
  source,
  *,
  mesh,
  batch_size: int,
  resize_size: int,
  crop_size: int,
  max_images: int = -1,
  num_workers: int = 0,
  log_every: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of every image of a source, once, in source order.

  The result is the same for any ``num_workers``, batch size and process
  count. Undecodable images are dropped and named in one warning.

  Args:
    feature_fn: jittable ``images [B, S, S, 3] -> features [B, F]``.
    source: random-access source.
    mesh: device mesh; each global batch is split over its devices.
    batch_size: global batch size (a multiple of the device count).
    resize_size: shorter-side resize.
    crop_size: centre crop.
    max_images: use the first ``max_images`` images (-1: all).
    num_workers: grain decode workers.
    log_every: progress line every this many batches.

  Returns:
    (features float32 [N, F], labels int32 [N]) gathered from all processes,
    N = the number of decodable images among the first ``max_images``.
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
  sharding = parallel.batch_sharding(mesh, 0)
  run = jax.jit(feature_fn, in_shardings=sharding, out_shardings=sharding)
  # Every process runs the same number of steps (pads with invalid rows).
  if count > 1:
    n_batches = int(
      multihost_utils.process_allgather(np.int32(n_batches)).max()
    )
  gather = (
    (lambda x: np.asarray(multihost_utils.process_allgather(x)))
    if count > 1
    else np.asarray
  )
  feats, labels, valid, indices = [], [], [], []
  it = iter(ds)
  empty = {
    'image': np.zeros((0, crop_size, crop_size, 3), np.float32),
    'label': np.zeros((0,), np.int32),
    'index': np.zeros((0,), np.int32),
    'valid': np.zeros((0,), bool),
  }
  try:
    for i in range(n_batches):
      batch = _pad(_private(next(it, empty)), local_batch)
      images = jax.make_array_from_process_local_data(sharding, batch['image'])
      out = run(images)
      out = multihost_utils.process_allgather(out) if count > 1 else out
      feats.append(np.asarray(jax.device_get(out), np.float32))
      for name, rows in (
        ('label', labels),
        ('valid', valid),
        ('index', indices),
      ):
        rows.append(gather(batch[name]).reshape(-1))
      if log_every and (i + 1) % log_every == 0:
        logger.info('features: batch %d/%d', i + 1, n_batches)
  finally:
    close = getattr(it, 'close', None)  # stops grain worker processes
    if close is not None:
      close()
      it = None  # with its buffers
      pipeline.release_shared_memory()
  index_all = np.concatenate(indices)
  valid_all = np.concatenate(valid).astype(bool)
  real = index_all >= 0  # padding rows carry index -1
  report_undecodable(source, index_all[real & ~valid_all])
  keep = np.flatnonzero(real & valid_all)
  keep = keep[np.argsort(index_all[keep], kind='stable')]  # source order
  feats = np.concatenate(feats).reshape(len(index_all), -1)
  return feats[keep], np.concatenate(labels)[keep].astype(np.int32)


def cls_feature_fn(model, params, dtype=jnp.float32):
  """Backbone CLS after the final norm (the k-NN feature, SPEC §7.1)."""

  def fn(images):
    return model.apply({'params': params}, images.astype(dtype)).astype(
      jnp.float32
    )

  return fn
