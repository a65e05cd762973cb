"""Host input pipeline on grain, and global arrays over the mesh.

source -> decode to a fixed canvas (an undecodable record is replaced by the
next decodable one) -> shuffle (per epoch, seeded) -> repeat -> this
process's rows of each global batch -> batch -> start at batch
``start_batch`` -> decoded ahead on threads ->
``jax.make_array_from_process_local_data``. Every stage is a
random-access ``MapDataset``, so batch k is the same whatever the number of
threads, and a run resumes at batch ``state.step`` with no iterator state.
The augmentation runs on device (``multicrop``), so the host only decodes.
"""

import io
import logging

import grain
import jax
import numpy as np
from PIL import Image

from dino_jax import interrupt, parallel
from dino_jax.data.sources import DataError

logger = logging.getLogger(__name__)

# Undecodable records recorded per image (source indices, -1 padded).
MAX_SKIPPED_PER_IMAGE = 4
# Consecutive undecodable records after which the data is declared broken.
DECODE_WINDOW = 64


class CanvasDecoder(grain.transforms.Map):
  """Record -> {image uint8 [C, C, 3] (top-left), size int32 [2], label}.

  RGB as PIL ``convert('RGB')`` (gray replicated, alpha dropped, CMYK and
  palette converted). Images larger than the canvas are downscaled with
  antialiasing, aspect kept (SPEC §5.4 accepted deviation); undecodable
  records get ``valid=False`` and ``error`` (the reason).
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
      return {
        'image': np.zeros((c, c, 3), np.uint8),
        'size': np.array([1, 1], np.int32),
        'label': np.int32(record.get('label', -1)),
        'valid': False,
        'error': f'{type(e).__name__}: {e}',
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


def describe(record) -> str:
  """A record's file path, or a short stand-in for in-memory records."""
  return str(record.get('path', '<in-memory image>'))


class DecodedSource:
  """Random access to decoded canvases; bad records replaced, not dropped.

  Index i decodes record i; if it is undecodable, records i+1, i+2, ...
  (wrapping) are tried, and the first that decodes is returned. Each
  returned record carries ``skipped`` int32 [MAX_SKIPPED_PER_IMAGE]: the
  source indices passed over (-1 padded), for the main process to report.
  Replacing instead of filtering keeps the batch count per epoch fixed and
  batch k independent of the worker count.

  Raises:
    DataError: none of DECODE_WINDOW consecutive records decodes.
  """

  def __init__(self, source, canvas_size: int, window: int = DECODE_WINDOW):
    self.source = source
    self.decoder = CanvasDecoder(canvas_size)
    self.window = min(window, len(source))

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    n = len(self.source)
    skipped = []
    for offset in range(self.window):
      j = (index + offset) % n
      record = self.source[j]
      out = self.decoder.map(record)
      if out.pop('valid'):
        ids = np.full((MAX_SKIPPED_PER_IMAGE,), -1, np.int32)
        ids[: len(skipped)] = skipped[:MAX_SKIPPED_PER_IMAGE]
        out['skipped'] = ids
        return out
      skipped.append(j)
      error = out['error']
    raise DataError(
      f'none of {self.window} consecutive images decodes (from '
      f'{describe(self.source[index % n])}; last error {error}); check '
      'data.path and the files'
    )


def read(ds: grain.MapDataset, num_threads: int) -> grain.IterDataset:
  """``ds`` read in order, its elements computed ahead on ``num_threads``
  of grain's threads in this process (at least 1).

  Threads rather than worker processes (docs/cpu-performance.md, host
  input pipeline): decoding (PIL) and copying release the GIL, batches
  are not copied between processes, and nothing is put in shared memory,
  so a run killed outright leaves nothing in /dev/shm. Signals stay the
  main thread's. A few batches are read ahead per thread; grain's default
  read-ahead of 500 elements would be 500 batches here.
  """
  num_threads = max(1, num_threads)
  return ds.to_iter_dataset(
    grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(2, num_threads)
    )
  )


class _Rows:
  """Global batches of ``parent``, restricted to this process's ``rows``.

  Element ``k * len(rows) + t`` is ``parent[k * batch_size + rows[t]]``:
  batching ``len(rows)`` of them gives rows ``rows`` of global batch k,
  with nothing else decoded. With every row (one process) it is ``parent``.
  """

  def __init__(self, parent, batch_size: int, rows: np.ndarray):
    self.parent, self.batch_size, self.rows = parent, batch_size, rows

  def __len__(self) -> int:
    return len(self.parent) // self.batch_size * len(self.rows)

  def __getitem__(self, index: int):
    batch, t = divmod(index, len(self.rows))
    return self.parent[batch * self.batch_size + int(self.rows[t])]


def train_batches(
  source,
  *,
  batch_size: int,
  canvas_size: int,
  seed: int,
  start_batch: int = 0,
  rows: np.ndarray | None = None,
) -> grain.MapDataset:
  """``train_dataset``'s batches as a random-access ``MapDataset``: element
  j is batch ``start_batch + j``, decoded when it is read."""
  rows = np.arange(batch_size) if rows is None else np.asarray(rows)
  if len(source) < batch_size:
    raise ValueError(
      f'the data has {len(source)} images, fewer than one global batch '
      f'({batch_size})'
    )
  ds = grain.MapDataset.source(DecodedSource(source, canvas_size))
  # First shuffle, then repeat: a new permutation every epoch.
  ds = ds.shuffle(seed=seed).repeat()
  if len(rows) < batch_size:
    ds = grain.MapDataset.source(_Rows(ds, batch_size, rows))
  return ds.batch(len(rows), drop_remainder=True)[start_batch:]


def train_dataset(
  source,
  *,
  batch_size: int,
  canvas_size: int,
  seed: int,
  num_workers: int = 0,
  start_batch: int = 0,
  rows: np.ndarray | None = None,
) -> grain.IterDataset:
  """Infinite, shuffled batches of decoded canvases: this process's rows.

  Global batch k holds positions ``[k * batch_size, (k + 1) * batch_size)``
  of one seeded permutation of the data per epoch, whatever the number of
  processes, devices or workers: a run resumed with another process count
  (or mesh) trains on the same batches. Each process decodes only the rows
  its devices hold (``parallel.process_rows``).

  Args:
    source: a random-access source (``sources.make_source``).
    batch_size: the global batch size.
    canvas_size: C.
    seed: shuffle seed; epoch e uses a permutation derived from (seed, e).
    num_workers: decode threads (``read``; 0: one).
    start_batch: index of the first batch (a resumed run passes its step).
    rows: the global-batch rows this process supplies, ascending (the
      order ``jax.make_array_from_process_local_data`` expects); default
      all of them (one process).

  Returns:
    A grain ``IterDataset`` of dicts: image uint8 [b, C, C, 3], size int32
    [b, 2], label int32 [b], skipped int32 [b, MAX_SKIPPED_PER_IMAGE], with
    b = ``len(rows)``.
  """
  ds = train_batches(
    source,
    batch_size=batch_size,
    canvas_size=canvas_size,
    seed=seed,
    start_batch=start_batch,
    rows=rows,
  )
  return read(ds, num_workers)


class TrainFeed:
  """The training loop's batches from ``start`` (the data position is the
  step), laid out on the mesh, one read ahead.

  Read on a thread (``interrupt.Reader``): a wait for data polls the stop
  request. ``take()`` -> (skipped rows, global batch), the batch read ahead
  if there is one; None when a signal stopped the wait, or when the
  pipeline failed after a signal (a worker killed with the process group):
  the state is whole, the loop saves it. ``read_ahead()`` reads the next
  batch and starts its transfer to the devices while a step runs.
  """

  def __init__(self, source, config, mesh, start: int):
    self.mesh = mesh
    self.reader = interrupt.Reader(
      iter(
        train_dataset(
          source,
          batch_size=config.batch_size,
          rows=parallel.process_rows(mesh, config.batch_size),
          canvas_size=config.data.canvas_size,
          seed=config.seed,
          num_workers=config.data.num_workers,
          start_batch=start,
        )
      )
    )
    self.ahead = None

  def take(self):
    batch, self.ahead = self.ahead, None
    return batch if batch is not None else self._read()

  def read_ahead(self) -> None:
    self.ahead = self._read()

  def _read(self):
    try:
      local = self.reader.next()
    except interrupt.Stopped:
      return None
    except Exception:
      if interrupt.requested() is None:
        raise
      logger.warning('input pipeline stopped after the signal', exc_info=1)
      return None
    skipped = local.pop('skipped')
    return skipped, global_batch(self.mesh, local)

  def close(self, wait: float = 10.0) -> None:
    """Stops grain's decode threads (``interrupt.Reader.close``)."""
    self.reader.close(wait)


class SkippedFiles:
  """Distinct undecodable records seen in training batches, reported once.

  The first ``show`` are logged with their path and reason, then every
  power of two of the distinct count.
  """

  def __init__(self, source, show: int = 5):
    self.source = source
    self.show = show
    self.seen: set[int] = set()

  def update(self, skipped: np.ndarray) -> None:
    for j in np.unique(np.asarray(skipped)):
      j = int(j)
      if j < 0 or j in self.seen:
        continue
      self.seen.add(j)
      n = len(self.seen)
      if n <= self.show:
        record = self.source[j]
        error = CanvasDecoder(1).map(record).get('error', '?')
        logger.warning(
          'skipped undecodable image %s (%s); the next decodable image '
          'takes its place',
          describe(record),
          error,
        )
      elif n & (n - 1) == 0:
        logger.warning('%d distinct undecodable images skipped so far', n)


def global_batch(mesh, local_batch: dict[str, np.ndarray]) -> dict:
  """Process-local numpy batches -> global ``jax.Array``s split on dim 0."""
  sharding = parallel.batch_sharding(mesh, 0)
  return {
    k: jax.make_array_from_process_local_data(sharding, v)
    for k, v in local_batch.items()
    if k != 'skipped'  # host-side bookkeeping, not model input
  }
