"""Copy detection on Copydays (SPEC-downstream §2).

CLI::

  python -m dino_jax.eval.copy_detection --workdir=DIR --data_root=COPYDAYS \
    [--distractors=DIR] [--whitening=DIR] [--imsize=320] [--official]

Images are resized to ``imsize`` x ``imsize`` (bicubic, aspect not kept),
ImageNet-normalized; the feature is the teacher's last-block CLS token
(after the final norm) concatenated with the GeM (p = 4, tokens clamped at
1e-6) of its patch tokens. With a whitening set: PCA whitening learned on
it (centred covariance; ``--official``: the official uncentred X^T X / n),
eigenvalues clamped at lambda_max * 1e-5, applied after subtracting the
set's mean. Features are L2-normalized; each query block (``strong``,
``jpegqual/*``, ``crops/*``) searches the originals (plus distractors) by
cosine similarity; AP over the top 20 (the Holidays trapezoid), mAP per
block, written to WORKDIR/eval/copy_detection.json.
"""

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dino_jax import interrupt, parallel
from dino_jax.data import multicrop, sources
from dino_jax.evaluation import common, features

logger = logging.getLogger(__name__)

TOP_K = 20
GEM_P = 4.0
GEM_EPS = 1e-6
EIGEN_FLOOR = 1e-5


class CopydaysError(ValueError):
  """Bad Copydays input (a missing folder, an unreadable image)."""


# ----------------------------------------------------------------- data


def list_images(directory: str, jpg_only: bool = False) -> list[str]:
  """Sorted image paths directly in ``directory``."""
  ext = ('.jpg',) if jpg_only else sources.IMG_EXTENSIONS
  names = sorted(n for n in os.listdir(directory) if n.lower().endswith(ext))
  return [os.path.join(directory, n) for n in names]


def _numeric_subdirs(root: str, group: str) -> list[str]:
  path = os.path.join(root, group)
  if not os.path.isdir(path):
    return []
  subs = [s for s in os.listdir(path) if os.path.isdir(os.path.join(path, s))]
  key = lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s)  # noqa: E731
  return [f'{group}/{s}' for s in sorted(subs, key=key)]


def query_blocks(root: str) -> list[str]:
  """The query blocks present under ``root``: strong, jpegqual/*, crops/*.

  Each must hold at least one .jpg; numeric subfolders in numeric order.
  """
  names = ['strong', *_numeric_subdirs(root, 'jpegqual')]
  names += _numeric_subdirs(root, 'crops')
  return [
    n
    for n in names
    if os.path.isdir(os.path.join(root, n))
    and list_images(os.path.join(root, n), jpg_only=True)
  ]


def block_positives(
  block: str, query_names: list[str], original_names: list[str]
) -> list[list[int]]:
  """The originals each query of ``block`` copies (indices into originals).

  'strong': the originals sharing the query's first 4 filename characters;
  any other block: the i-th query is the i-th original (sorted names).
  """
  if block == 'strong':
    return [
      [j for j, o in enumerate(original_names) if o[:4] == q[:4]]
      for q in query_names
    ]
  if len(query_names) != len(original_names):
    raise CopydaysError(
      f'block {block} holds {len(query_names)} images and original '
      f'{len(original_names)}: its i-th image must copy the i-th original; '
      'give every block one image per original'
    )
  return [[i] for i in range(len(query_names))]


def load_image(path: str, imsize: int) -> np.ndarray:
  """[imsize, imsize, 3] float32: bicubic resize, ImageNet-normalized."""
  try:
    with Image.open(path) as f:
      image = f.convert('RGB')
  except Exception as e:  # noqa: BLE001 - reported by path
    raise CopydaysError(f'cannot read image {path}: {e}') from e
  image = image.resize((imsize, imsize), Image.BICUBIC)
  x = np.asarray(image, np.float32) / 255.0
  mean, std = np.array(multicrop.MEAN), np.array(multicrop.STD)
  return ((x - mean) / std).astype(np.float32)


# ------------------------------------------------------------- features


def gem_features(tokens: jax.Array) -> jax.Array:
  """[B, 1 + N, D] tokens -> [B, 2 D]: CLS, then GeM(p=4) of the patches."""
  cls = tokens[:, 0]
  patches = jnp.maximum(tokens[:, 1:], GEM_EPS)
  gem = jnp.mean(patches**GEM_P, axis=1) ** (1.0 / GEM_P)
  return jnp.concatenate([cls, gem], axis=-1).astype(jnp.float32)


def copy_features(model, params, images: jax.Array) -> jax.Array:
  """[B, S, S, 3] -> [B, 2 D]: last block after the final norm, CLS + GeM."""
  tokens = model.apply({'params': params}, images, method='features')
  return gem_features(tokens.astype(jnp.float32))


@functools.lru_cache(maxsize=8)
def jit_copy_features(model, mesh):
  """Jitted ``copy_features(params, images)``, batch split over ``mesh``."""
  fn = functools.partial(copy_features, model)
  if mesh is None:
    return jax.jit(fn)
  batch = parallel.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(None, batch), out_shardings=batch)


def extract(
  paths: list[str],
  model,
  params,
  mesh,
  *,
  imsize: int = 320,
  batch_size: int = 16,
) -> np.ndarray:
  """[len(paths), 2 D] float32 features, in the order of ``paths``.

  Each batch (padded to a multiple of the device count) is one global
  array split over ``mesh``; each process reads only the images of its
  devices' rows, and the features are gathered by position. An image
  that cannot be read fails every process alike (``CopydaysError``).
  ``interrupt.check()`` between batches.
  """
  fn = jit_copy_features(model, mesh)
  devices = 1 if mesh is None else mesh.devices.size
  size = -(-batch_size // devices) * devices
  shape = (size, imsize, imsize, 3)
  out = []
  for start in range(0, len(paths), size):
    interrupt.check()
    chunk = paths[start : start + size]
    failures = {}

    def rows(index, chunk=chunk, failures=failures):
      """This process's rows of the batch (``index``: their slices)."""
      lo, hi, _ = index[0].indices(size)
      x = np.zeros((hi - lo, *shape[1:]), np.float32)
      for j in range(lo, min(hi, len(chunk))):
        try:
          x[j - lo] = load_image(chunk[j], imsize)
        except CopydaysError as e:
          failures[j] = str(e)
      return x

    def failed_rows(index, failures=failures):
      lo, hi, _ = index[0].indices(size)
      return np.array([j in failures for j in range(lo, hi)], np.int32)

    if mesh is None:
      feats = np.asarray(fn(params, rows((slice(None),))))
      bad = failed_rows((slice(None),))
    else:
      sharding = parallel.batch_sharding(mesh)
      images = jax.make_array_from_callback(shape, sharding, rows)
      failed = jax.make_array_from_callback((size,), sharding, failed_rows)
      feats, bad = features.gather(mesh, (fn(params, images), failed))
    for j in np.flatnonzero(bad):
      raise CopydaysError(
        failures.get(j, f'cannot read image {chunk[j]} (another process)')
      )
    out.append(np.asarray(feats, np.float32)[: len(chunk)])
  if not out:
    return np.zeros((0, 0), np.float32)
  return np.concatenate(out)


# ------------------------------------------------------------ whitening


def l2_normalize(x: np.ndarray) -> np.ndarray:
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norm, 1e-12)


def learn_whitening(x: np.ndarray, official: bool = False):
  """PCA whitening learned on ``x`` [n, F]: (mean [F], projection [F, F]).

  Covariance: centred ``(x - m)^T (x - m) / n``; ``official``: the official
  code's uncentred ``x^T x / n``. Eigenvalues below lambda_max * 1e-5 are
  raised to it; rows of the projection are ``lambda^-1/2 v^T``, largest
  eigenvalue first. Apply with ``whiten``.
  """
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=0)
  centred = x if official else x - mean
  cov = centred.T @ centred / x.shape[0]
  eigvals, eigvecs = np.linalg.eigh(cov)
  eigvals = np.maximum(eigvals, eigvals.max() * EIGEN_FLOOR)
  order = np.argsort(eigvals, kind='stable')[::-1]
  eigvals, eigvecs = eigvals[order], eigvecs[:, order]
  projection = eigvecs.T / np.sqrt(eigvals)[:, None]  # diag(l^-1/2) V^T
  return mean, projection


def whiten(x: np.ndarray, mean: np.ndarray, projection: np.ndarray):
  """(x - mean) projected, then L2-normalized: [n, F]."""
  y = (np.asarray(x, np.float64) - mean) @ projection.T
  return l2_normalize(y)


# -------------------------------------------------------------- scoring


def average_precision(ranks, n_positives: int) -> float:
  """Holidays AP: trapezoids of the PR curve at the positives' ranks.

  Args:
    ranks: ascending 0-based ranks of the retrieved true positives.
    n_positives: positives in the database (0: AP 0).
  """
  if n_positives == 0:
    return 0.0
  ap = 0.0
  for found, rank in enumerate(ranks):
    left = 1.0 if rank == 0 else found / rank
    right = (found + 1) / (rank + 1)
    ap += (left + right) / (2.0 * n_positives)
  return ap


def top_k(queries: np.ndarray, database: np.ndarray, k: int = TOP_K):
  """Indices [q, min(k, N)] of the most cosine-similar database rows."""
  sim = l2_normalize(queries) @ l2_normalize(database).T
  k = min(k, database.shape[0])
  return np.argsort(-sim, axis=1, kind='stable')[:, :k]


def mean_ap(retrieved: np.ndarray, positives: list[list[int]]) -> float:
  """Mean over queries of the AP of their top-k lists."""
  aps = []
  for row, pos in zip(retrieved, positives, strict=True):
    pos = set(pos)
    ranks = [r for r, j in enumerate(row) if int(j) in pos]
    aps.append(average_precision(ranks, len(pos)))
  return float(np.mean(aps)) if aps else 0.0


def evaluate(
  blocks: dict,
  database: np.ndarray,
  whitening: tuple | None = None,
  k: int = TOP_K,
) -> dict:
  """mAP per block.

  Args:
    blocks: {name: (query features [q, F], positives per query)}.
    database: [N, F] features (originals first, then distractors).
    whitening: (mean, projection) from ``learn_whitening``, or None.
    k: list length.

  Returns:
    {name: mAP in [0, 1]}.
  """
  prep = (lambda x: whiten(x, *whitening)) if whitening else l2_normalize
  db = prep(database)
  return {
    name: mean_ap(top_k(prep(q), db, k), pos)
    for name, (q, pos) in blocks.items()
  }


# ------------------------------------------------------------------ CLI


def _check_dir(flag: str, path: str | None, required: bool = False):
  if path is None and not required:
    return
  if not path or not os.path.isdir(path):
    raise CopydaysError(
      f'--{flag}={path} is not a directory; pass an existing folder'
    )


def plan(
  data_root: str,
  distractors: str | None = None,
  whitening: str | None = None,
  imsize: int = 320,
  batch_size: int = 16,
) -> dict:
  """Validates the options and lists every image: nothing read or written.

  Returns:
    {'originals': [path], 'queries': {block: ([path], positives)},
    'distractors': [path], 'whitening': [path]}.

  Raises:
    CopydaysError: a missing folder, an empty block, a bad size.
  """
  _check_dir('data_root', data_root, required=True)
  _check_dir('distractors', distractors)
  _check_dir('whitening', whitening)
  if imsize <= 0:
    raise CopydaysError(f'--imsize={imsize} must be positive')
  if batch_size <= 0:
    raise CopydaysError(f'--batch_size={batch_size} must be positive')
  original_dir = os.path.join(data_root, 'original')
  originals = (
    list_images(original_dir, jpg_only=True)
    if os.path.isdir(original_dir)
    else []
  )
  if not originals:
    raise CopydaysError(
      f'--data_root={data_root} has no original/*.jpg; pass the Copydays root'
    )
  names = [os.path.basename(p) for p in originals]
  queries = {}
  for block in query_blocks(data_root):
    paths = list_images(os.path.join(data_root, block), jpg_only=True)
    pos = block_positives(block, [os.path.basename(p) for p in paths], names)
    queries[block] = (paths, pos)
  if not queries:
    raise CopydaysError(
      f'--data_root={data_root} has no query block (strong/, jpegqual/N/, '
      'crops/N/ with .jpg files); pass the Copydays root'
    )
  out = {'originals': originals, 'queries': queries}
  for flag, path in (('distractors', distractors), ('whitening', whitening)):
    out[flag] = list_images(path) if path else []
    if path and not out[flag]:
      raise CopydaysError(f'--{flag}={path} holds no images; pass a folder')
  return out


def copy_detection_evaluation(
  config,
  mesh,
  backbone,
  params,
  *,
  data_root: str,
  distractors: str | None = None,
  whitening: str | None = None,
  imsize: int = 320,
  batch_size: int = 16,
  official: bool = False,
) -> dict:
  """The evaluation of a backbone on Copydays: its record.

  The interface every evaluation shares: the CLI and
  ``evaluation.run.after_training`` (``eval.copydays_root``) call it alike, on
  any number of processes (each reads its devices' rows of a batch).

  Args:
    config: the run's config (a ViT: ``model.arch``; the options come as
      arguments).
    mesh: the device mesh ``params`` live on.
    backbone: the ViT backbone module.
    params: its parameters (any sharding over ``mesh``).
    data_root: the Copydays root (original/, strong/, jpegqual/, crops/).
    distractors: a folder of distractor images (None or '': none).
    whitening: a folder to learn the PCA whitening on (None or '': none).
    imsize: the square resize of every image.
    batch_size: images per batch (rounded up to the device count).
    official: the uncentred whitening covariance.

  Returns:
    {'imsize', 'official', 'top_k', 'originals', 'distractors',
    'whitening_images', 'blocks': {block: {'queries', 'mAP'}}}, mAP in
    [0, 1].

  Raises:
    CopydaysError: bad data or options (one line naming them).
  """
  common.require_vit(config, 'copy detection')
  images = plan(
    data_root, distractors or None, whitening or None, imsize, batch_size
  )
  extract_fn = functools.partial(
    extract,
    model=backbone,
    params=params,
    mesh=mesh,
    imsize=imsize,
    batch_size=batch_size,
  )
  database = extract_fn(images['originals'])
  if images['distractors']:
    database = np.concatenate([database, extract_fn(images['distractors'])])
  blocks = {
    name: (extract_fn(paths), pos)
    for name, (paths, pos) in images['queries'].items()
  }
  learned = None
  if images['whitening']:
    learned = learn_whitening(
      extract_fn(images['whitening']), official=official
    )
  maps = evaluate(blocks, database, learned)
  return {
    'imsize': imsize,
    'official': bool(official),
    'top_k': TOP_K,
    'originals': len(images['originals']),
    'distractors': len(images['distractors']),
    'whitening_images': len(images['whitening']),
    'blocks': {
      name: {'queries': len(images['queries'][name][0]), 'mAP': m}
      for name, m in maps.items()
    },
  }


def format_results(record: dict, step: int) -> str:
  lines = [f'Copydays copy detection (step {step}), mAP over the top {TOP_K}:']
  lines += [
    f'  {name:12s} {b["mAP"]:.3f}' for name, b in record['blocks'].items()
  ]
  return '\n'.join(lines)
