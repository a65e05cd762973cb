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
  """Record -> {image float32 [S, S, 3] normalized, label, valid}."""

  def __init__(self, resize_size: int, crop_size: int):
    self.resize_size, self.crop_size = resize_size, crop_size
    self._decoder = pipeline.CanvasDecoder(1 << 30)  # decode only, no canvas

  def map(self, record):
    s = self.crop_size
    try:
      image = self._decoder._to_pil(record).convert('RGB')
    except Exception as e:  # noqa: BLE001 - bad files are skipped
      logger.warning('eval: skipped undecodable image: %s', e)
      return {
        'image': np.zeros((s, s, 3), np.float32),
        'label': np.int32(-1),
        'valid': False,
      }
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
    return {
      'image': x.astype(np.float32),
      'label': np.int32(record.get('label', -1)),
      'valid': True,
    }


def _pad(batch: dict, size: int) -> dict:
  n = len(batch['label'])
  if n == size:
    return batch
  return {
    k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
    for k, v in batch.items()
  }


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
  """Features and labels of a whole source, in source order per process.

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
    (features float32 [N, F], labels int32 [N]) gathered from all processes
    (bad images dropped).
  """
  n = len(source) if max_images < 0 else min(max_images, len(source))
  count, index = jax.process_count(), jax.process_index()
  local_batch = batch_size // count
  ds = grain.MapDataset.source(source)[:n][index::count]
  ds = ds.map(EvalTransform(resize_size, crop_size)).to_iter_dataset()
  ds = ds.batch(local_batch, drop_remainder=False)
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  sharding = parallel.batch_sharding(mesh, 0)
  run = jax.jit(feature_fn, in_shardings=sharding, out_shardings=sharding)
  n_batches = -(-len(range(index, n, count)) // local_batch)
  # Every process runs the same number of steps (pads with invalid rows).
  n_batches = (
    int(multihost_utils.process_allgather(np.int32(n_batches)).max())
    if count > 1
    else n_batches
  )
  feats, labels, valid = [], [], []
  it = iter(ds)
  empty = {
    'image': np.zeros((local_batch, crop_size, crop_size, 3), np.float32),
    'label': np.full((local_batch,), -1, np.int32),
    'valid': np.zeros((local_batch,), bool),
  }
  for i in range(n_batches):
    batch = _pad(next(it, empty), local_batch)
    images = jax.make_array_from_process_local_data(sharding, batch['image'])
    out = run(images)
    out = multihost_utils.process_allgather(out) if count > 1 else out
    feats.append(np.asarray(jax.device_get(out), np.float32))
    gather = (
      (lambda x: np.asarray(multihost_utils.process_allgather(x)))
      if count > 1
      else np.asarray
    )
    labels.append(gather(batch['label']))
    valid.append(gather(batch['valid']))
    if log_every and (i + 1) % log_every == 0:
      logger.info('features: batch %d/%d', i + 1, n_batches)
  valid_mask = np.concatenate(valid).astype(bool)
  return (
    np.concatenate(feats)[valid_mask],
    np.concatenate(labels)[valid_mask].astype(np.int32),
  )


def cls_feature_fn(model, params, dtype=jnp.float32):
  """Backbone CLS after the final norm (the k-NN feature, SPEC §7.1)."""

  def fn(images):
    return model.apply({'params': params}, images.astype(dtype)).astype(
      jnp.float32
    )

  return fn
