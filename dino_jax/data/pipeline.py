"""Host input pipeline on grain, and global arrays over the mesh.

source -> slice for this process -> shuffle (per epoch, seeded) -> repeat ->
decode to a fixed canvas (worker processes) -> drop bad images -> batch ->
``jax.make_array_from_process_local_data``. The augmentation runs on device
(``multicrop``), so the host only decodes.
"""

import io
import logging

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from dino_jax import parallel

logger = logging.getLogger(__name__)


class CanvasDecoder(grain.transforms.Map):
  """Record -> {image uint8 [C, C, 3] (top-left), size int32 [2], label}.

  RGB as PIL ``convert('RGB')`` (gray replicated, alpha dropped, CMYK and
  palette converted). Images larger than the canvas are downscaled with
  antialiasing, aspect kept (SPEC §5.4 accepted deviation); undecodable
  records get ``valid=False`` and are dropped. Both are counted per worker
  process and logged.
  """

  def __init__(self, canvas_size: int):
    self.canvas_size = canvas_size
    self.bad = 0
    self.downscaled = 0

  def _to_pil(self, record) -> Image.Image:
    if 'path' in record:
      with open(record['path'], 'rb') as f:
        image = Image.open(io.BytesIO(f.read()))
        image.load()
      return image
    if 'bytes' in record:
      image = Image.open(io.BytesIO(record['bytes']))
      image.load()
      return image
    array = np.asarray(record['image'])
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]
    return Image.fromarray(array.astype(np.uint8))

  def map(self, record):
    c = self.canvas_size
    try:
      image = self._to_pil(record).convert('RGB')
      w, h = image.size
      if h == 0 or w == 0:
        raise ValueError('empty image')
    except Exception as e:  # noqa: BLE001 - any decode failure is a bad file
      self.bad += 1
      if self.bad & (self.bad - 1) == 0:  # 1, 2, 4, ... per worker
        logger.warning(
          'skipped %d undecodable image(s) so far; latest %s: %s',
          self.bad,
          record.get('path', '<array>'),
          e,
        )
      return {
        'image': np.zeros((c, c, 3), np.uint8),
        'size': np.array([1, 1], np.int32),
        'label': np.int32(record.get('label', -1)),
        'valid': False,
      }
    if max(h, w) > c:
      scale = c / max(h, w)
      w, h = max(1, round(w * scale)), max(1, round(h * scale))
      image = image.resize((w, h), Image.BICUBIC)
      self.downscaled += 1
      if self.downscaled & (self.downscaled - 1) == 0:
        logger.info(
          '%d image(s) larger than the %d canvas downscaled so far',
          self.downscaled,
          c,
        )
    canvas = np.zeros((c, c, 3), np.uint8)
    canvas[:h, :w] = np.asarray(image)
    return {
      'image': canvas,
      'size': np.array([h, w], np.int32),
      'label': np.int32(record.get('label', -1)),
      'valid': True,
    }


def _drop_valid(batch):
  return {k: v for k, v in batch.items() if k != 'valid'}


def train_dataset(
  source,
  *,
  batch_size: int,
  canvas_size: int,
  seed: int,
  num_workers: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.IterDataset:
  """Infinite, shuffled, per-process batches of decoded canvases.

  Args:
    source: a random-access source (``sources.make_source``).
    batch_size: per-process batch size.
    canvas_size: C.
    seed: shuffle seed; epoch e uses a permutation derived from (seed, e).
    num_workers: decode processes (0: in the main process).
    process_index: this process's shard (default ``jax.process_index()``).
    process_count: number of shards (default ``jax.process_count()``).

  Returns:
    A grain ``IterDataset`` of dicts: image uint8 [b, C, C, 3], size int32
    [b, 2], label int32 [b]. Its iterator's state checkpoints exactly.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if len(source) < count * batch_size:
    raise ValueError(
      f'the data has {len(source)} images, fewer than one global batch '
      f'({count} processes x {batch_size})'
    )
  ds = grain.MapDataset.source(source)[index::count]
  # First shuffle, then repeat: a new permutation every epoch.
  ds = ds.shuffle(seed=seed).repeat()
  ds = ds.map(CanvasDecoder(canvas_size)).filter(lambda r: r['valid'])
  ds = ds.to_iter_dataset()
  ds = ds.batch(batch_size, drop_remainder=True).map(_drop_valid)
  if num_workers > 0:
    # grain workers read absl flags; outside an absl app they are unparsed.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def global_batch(mesh, local_batch: dict[str, np.ndarray]) -> dict:
  """Process-local numpy batches -> global ``jax.Array``s split on dim 0."""
  sharding = parallel.batch_sharding(mesh, 0)
  return {
    k: jax.make_array_from_process_local_data(sharding, v)
    for k, v in local_batch.items()
  }
