"""Host input pipeline on grain, and global arrays over the mesh.

source -> decode to a fixed canvas (an undecodable record is replaced by the
next decodable one) -> shuffle (per epoch, seeded) -> repeat -> this
process's rows of each global batch -> batch -> start at batch
``start_batch`` -> worker processes ->
``jax.make_array_from_process_local_data``. Every stage is a
random-access ``MapDataset``, so batch k is the same whatever the number of
workers, and a run resumes at batch ``state.step`` with no iterator state.
The augmentation runs on device (``multicrop``), so the host only decodes.
"""

import contextlib
import functools
import io
import logging
import os
import signal
import threading
import time

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from dino_jax import parallel
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


_SCHEDULER_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _init_worker(parent: int, worker_index: int, worker_count: int) -> None:
  """grain worker init: signals are the main process's; exit with it.

  Schedulers signal the whole process group; a worker that died on the
  signal would fail the main process's next batch before it could save.
  The worker started with both signals held (``_StartHeld``): one that came
  while it was starting is pending, and is dropped here, as ignored. A
  worker that ignores SIGTERM would outlive a main process killed hard
  (SIGKILL, the scheduler's last word), holding memory and the job's
  output pipe: a thread ends it once its parent is gone.
  """
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, _SCHEDULER_SIGNALS)
  threading.Thread(
    target=_exit_with, args=(parent,), name='exit-with-parent', daemon=True
  ).start()


def _exit_with(parent: int, poll_seconds: float = 0.5) -> None:
  while os.getppid() == parent:
    time.sleep(poll_seconds)
  os._exit(1)


@contextlib.contextmanager
def _signals_held():
  """Holds SIGTERM/SIGINT in this thread, and in what it starts meanwhile.

  The mask is inherited by threads created meanwhile and by the processes
  they spawn (fork and exec keep it), so a grain worker cannot die of a
  signal that arrives before its ``_init_worker`` runs (a worker spends
  seconds importing). The main process loses nothing: the signal goes to a
  thread that does not hold it, or stays pending until the mask is
  restored, and Python runs the handler in the main thread either way.
  """
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, _SCHEDULER_SIGNALS)
  try:
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _StartHeld(grain.IterDataset):
  """``parent``, its worker processes started with scheduler signals held.

  grain starts worker i from one of its threads when batch i is first asked
  for (its interleave takes batch i from worker i), so ``iter`` and the
  first ``num_workers`` calls of ``next`` run under ``_signals_held``.
  """

  def __init__(self, parent: grain.IterDataset, num_workers: int):
    super().__init__(parent)
    self._num_workers = num_workers

  def __iter__(self):
    with _signals_held():
      return _StartHeldIterator(iter(self._parent), self._num_workers)


class _StartHeldIterator(grain.DatasetIterator):
  def __init__(self, parent, num_workers: int):
    super().__init__(parent)
    self._held_calls = num_workers

  def __next__(self):
    if self._held_calls <= 0:
      return next(self._parent)
    self._held_calls -= 1
    with _signals_held():
      return next(self._parent)

  def close(self):
    self._parent.close()

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


# grain's ``min_shm_size`` above any batch: the workers' batches come back
# pickled through their pipes, none in /dev/shm (see ``prefetch``).
_NO_SHARED_MEMORY = 1 << 62


def prefetch(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  """``ds`` computed by ``num_workers`` processes (0: in this process).

  grain's worker processes (``mp_prefetch``), as grain ships them, with one
  of its options: batches come back through the workers' pipes rather than
  in shared memory (``DatasetOptions.min_shm_size``), so a run killed
  outright (SIGKILL to the group) leaves no batch in /dev/shm; what it
  leaves is the named semaphores (``sem.mp-*``, 32 bytes each) of the
  queues of multiprocessing's spawn context. The workers ignore SIGTERM and
  SIGINT from their start on (schedulers signal the whole process group;
  the main process saves and stops them) and exit with the main process.
  """
  if num_workers <= 0:
    return ds
  # grain workers read absl flags; outside an absl app they are unparsed.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  ds = grain.experimental.WithOptionsIterDataset(
    ds, grain.experimental.DatasetOptions(min_shm_size=_NO_SHARED_MEMORY)
  )
  return _StartHeld(
    ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers),
      worker_init_fn=functools.partial(_init_worker, os.getpid()),
    ),
    num_workers,
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
    num_workers: decode processes (0: in the main process).
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
  # A few batches decoded ahead on threads (PIL releases the GIL); grain's
  # default read-ahead of 500 elements would be 500 batches here.
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
  )
  return prefetch(ds, num_workers)


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
