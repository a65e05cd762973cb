"""Images/s of the host input pipeline alone: decode + canvas + batch.

  python benchmarks/host_pipeline.py                   # both kinds
  python benchmarks/host_pipeline.py --kinds jpeg --num_workers 2,4 \
    --modes library,threads

What the host does per training image (dino_jax/data/pipeline.py): read the
record, decode it with PIL, convert to RGB, place it on the uint8 canvas,
and batch; the multi-crop runs on the device. Two kinds of data:

  fashion_mnist  28 px IDX records (/usr/share/datasets/fashion-mnist),
                 canvas 28, as configs/fashion_mnist.py;
  jpeg           --images ImageNet-like 500 x 375 JPEGs (quality 90) made
                 in a temporary folder at start and deleted at the end,
                 canvas 512, as configs/vit_s16.py.

Rows (one JSON object each):

  stage decode    ``DecodedSource[i]`` in a loop in this process: decode and
                  canvas only;
  stage pipeline  the shuffled, decoded batches of ``pipeline.train_batches``
                  read one of --modes ways, n = each of --num_workers:
    library         ``pipeline.train_dataset(num_workers=n)``: what training
                    reads;
    threads         n of grain's threads in this process;
    processes       n of grain's worker processes as grain ships them
                    (batches in shared memory);
    processes_pipe  the same, batches through the workers' pipes (grain's
                    ``min_shm_size``).
                  Each mode is timed alone, in turns (``pipeline_rows``);
                  ``ratio_over_library`` compares images/s in one run.

``images_per_cpu_sec`` divides the images by the CPU time of this process and
its worker processes (user + system): the rate of one host core, whatever
the load of the machine. ``cores_for_<target>`` is the number of such cores
that feed one accelerator at <target> images/s (--targets per kind; the
defaults are the ViT-S/16 bf16 step on an H200, 1380 img/s, and 40,000 img/s
for the Fashion-MNIST model).
"""

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import timing

DEFAULT_TARGETS = {'fashion_mnist': (40000,), 'jpeg': (1380,)}
CANVAS = {'fashion_mnist': 28, 'jpeg': 512}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--kinds', default='fashion_mnist,jpeg')
  p.add_argument('--images', type=int, default=200, help='JPEGs to make')
  p.add_argument('--fashion_mnist', default='/usr/share/datasets/fashion-mnist')
  p.add_argument('--batch', type=int, default=64, help='per-process batch')
  p.add_argument(
    '--num_workers', default='2', help='comma list of thread or worker counts'
  )
  p.add_argument(
    '--seconds', type=float, default=16.0, help='per mode and worker count'
  )
  p.add_argument('--rounds', type=int, default=2, help='turns per mode')
  p.add_argument(
    '--drain', type=int, default=4, help='batches read before timing'
  )
  p.add_argument(
    '--modes',
    default='library,threads,processes',
    help=f'comma list of {", ".join(MODES)}',
  )
  p.add_argument(
    '--targets',
    default=None,
    help='comma list of accelerator img/s to size cores for (default: '
    'per kind, see DEFAULT_TARGETS)',
  )
  p.add_argument('--out', default=None, help='append JSON lines here')
  return p.parse_args(argv)


def make_jpegs(directory: str, count: int, seed: int = 0) -> float:
  """Writes ``count`` 500 x 375 RGB JPEGs; returns their mean size in KB.

  Smooth random colour fields plus fine noise: photo-like entropy, so the
  files (and their decode cost) are close to ImageNet's (~110 KB at about
  this size), where pure noise would be several times larger.
  """
  from PIL import Image

  rs = np.random.RandomState(seed)
  sizes = []
  for i in range(count):
    low = rs.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    field = np.asarray(
      Image.fromarray(low).resize((500, 375), Image.BICUBIC), np.float32
    )
    pixels = np.clip(field + rs.normal(0, 24, field.shape), 0, 255)
    path = os.path.join(directory, f'{i:05d}.jpg')
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    sizes.append(os.path.getsize(path))
  return float(np.mean(sizes)) / 1024


def cpu_seconds() -> float:
  """User + system CPU time of this process and its live children."""
  import psutil

  me = psutil.Process()
  total = 0.0
  for proc in [me, *me.children(recursive=True)]:
    try:
      t = proc.cpu_times()
    except psutil.Error:  # a child that just exited
      continue
    total += t.user + t.system
  return total


def rates(images: int, wall: float, cpu: float, targets) -> dict:
  per_core = images / cpu
  row = {
    'images': images,
    'wall_sec': round(wall, 3),
    'cpu_sec': round(cpu, 3),
    'images_per_sec': round(images / wall, 1),
    'images_per_cpu_sec': round(per_core, 1),
  }
  for target in targets:
    row[f'cores_for_{target}'] = round(target / per_core, 2)
  return row


def decode_row(source, canvas: int, targets) -> dict:
  """Decode + canvas of every record in turn, in this process."""
  from dino_jax.data import pipeline

  decoded = pipeline.DecodedSource(source, canvas)
  n = min(len(source), 2000)
  decoded[0]  # warm-up: imports, first file open
  wall, cpu = time.perf_counter(), time.process_time()
  for i in range(n):
    decoded[i]
  cpu = time.process_time() - cpu
  return {
    'stage': 'decode',
    **rates(n, time.perf_counter() - wall, cpu, targets),
  }


def _library(source, canvas: int, batch: int, n: int):
  """What training reads: ``pipeline.train_dataset`` with ``n`` workers."""
  from dino_jax.data import pipeline

  return pipeline.train_dataset(
    source, batch_size=batch, canvas_size=canvas, seed=0, num_workers=n
  )


def _threads(source, canvas: int, batch: int, n: int):
  """The same batches decoded on ``n`` of grain's threads, in-process."""
  import grain

  from dino_jax.data import pipeline

  ds = pipeline.train_batches(
    source, batch_size=batch, canvas_size=canvas, seed=0
  )
  return ds.to_iter_dataset(
    grain.ReadOptions(num_threads=n, prefetch_buffer_size=max(2, n))
  )


def _processes(source, canvas: int, batch: int, n: int, options=None):
  """The same batches from ``n`` of grain's worker processes, as grain
  ships them (``mp_prefetch``, no worker init, grain's shared memory)."""
  import grain

  from dino_jax.data import pipeline

  ds = pipeline.train_batches(
    source, batch_size=batch, canvas_size=canvas, seed=0
  )
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
  )
  if options is not None:
    ds = grain.experimental.WithOptionsIterDataset(ds, options)
  from absl import flags

  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=n))


def _processes_pipe(source, canvas: int, batch: int, n: int):
  """``_processes`` with grain's ``min_shm_size`` above any batch: batches
  are pickled through the workers' pipes, none in /dev/shm."""
  import grain

  options = grain.experimental.DatasetOptions(min_shm_size=1 << 62)
  return _processes(source, canvas, batch, n, options)


MODES = {
  'library': _library,
  'threads': _threads,
  'processes': _processes,
  'processes_pipe': _processes_pipe,
}


def _close(it) -> None:
  """Stops an iterator's threads and worker processes now, not at GC."""
  close = getattr(it, 'close', None)
  if close:
    close()


def pipeline_rows(source, canvas: int, args, n: int, targets) -> list[dict]:
  """Each mode with ``n`` threads or processes, timed alone, in turns.

  ``--rounds`` times, each mode in turn: a new iterator (workers started),
  ``--drain`` batches read (start-up, and the buffers it filled), then
  read for ``--seconds / --rounds``, then closed. One mode runs at a time,
  and the load of a shared machine hits all alike. CPU time counts this
  process and its children. ``ratio_over_library``: images/s over the
  library mode's, in the same run.
  """
  modes = args.modes.split(',')
  images = dict.fromkeys(modes, 0)
  wall = dict.fromkeys(modes, 0.0)
  cpu = dict.fromkeys(modes, 0.0)
  for _ in range(args.rounds):
    for mode in modes:
      it = iter(MODES[mode](source, canvas, args.batch, n))
      for _ in range(1 + args.drain):
        next(it)
      start, cpu_start = time.perf_counter(), cpu_seconds()
      while time.perf_counter() - start < args.seconds / args.rounds:
        batch = next(it)
        images[mode] += len(batch['image'])
      wall[mode] += time.perf_counter() - start
      cpu[mode] += cpu_seconds() - cpu_start
      assert batch['image'].shape == (args.batch, canvas, canvas, 3)
      del batch
      _close(it)
      del it
  rows = []
  for mode in modes:
    row = {
      'stage': 'pipeline',
      'mode': mode,
      'num_workers': n,
      'batch': args.batch,
      **rates(images[mode], wall[mode], cpu[mode], targets),
    }
    rows.append(row)
  if 'library' in modes:
    base = images['library'] / wall['library']
    for row in rows:
      row['ratio_over_library'] = round(row['images_per_sec'] / base, 3)
  return rows


def measure(args, emit=lambda rows: None) -> list[dict]:
  from dino_jax.data import sources

  rows = []
  workers = [int(w) for w in args.num_workers.split(',')]
  for mode in args.modes.split(','):
    if mode not in MODES:
      raise SystemExit(
        f'error: --modes: {mode!r} unknown; use {", ".join(MODES)}'
      )
  for kind in args.kinds.split(','):
    if kind not in CANVAS:
      raise SystemExit(f'--kinds: {kind!r} unknown; use {sorted(CANVAS)}')
    targets = (
      [int(t) for t in args.targets.split(',')]
      if args.targets
      else DEFAULT_TARGETS[kind]
    )
    base = {
      'benchmark': 'host_pipeline',
      'date': time.strftime('%Y-%m-%d'),
      'cpu': platform.processor() or platform.machine(),
      'host_cores': os.cpu_count(),
      'kind': kind,
      'canvas': CANVAS[kind],
    }
    tmp = None
    try:
      if kind == 'jpeg':
        tmp = tempfile.mkdtemp(prefix='dino_jax_jpegs_')
        base['jpeg_kb'] = round(make_jpegs(tmp, args.images), 1)
        base['jpeg_size'] = '500x375'
        source = sources.ImageFolderSource(tmp)
      else:
        source = sources.FashionMNISTSource('train', args.fashion_mnist)
      rows.append({**base, **decode_row(source, CANVAS[kind], targets)})
      emit(rows[-1:])
      for w in workers:
        new = pipeline_rows(source, CANVAS[kind], args, w, targets)
        rows += [{**base, **row} for row in new]
        emit(rows[-len(new) :])
    finally:
      if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
  return rows


def main(argv=None):
  args = parse_args(argv)
  measure(args, lambda rows: timing.emit(rows, args.out))  # as they come


if __name__ == '__main__':
  sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )
  main()
