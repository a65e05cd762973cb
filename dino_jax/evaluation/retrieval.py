"""Image retrieval on revisited Oxford / Paris (SPEC-downstream §1).

CLI: ``python -m dino_jax.eval.retrieval --workdir=DIR --data_root=ROOT
--dataset=roxford5k|rparis6k [--imsize=224] [--multiscale] [--official]``.

Data: ``ROOT/<dataset>/gnd_<dataset>.pkl`` (``imlist``, ``qimlist``,
``gnd``: one dict per query with ``bbx``, ``easy``, ``hard``, ``junk``) and
``ROOT/<dataset>/jpg/<name>.jpg``.

Features: the teacher's CLS after the final norm, one image at a time,
``thumbnail((imsize, imsize))`` (aspect kept, never upscaled), ImageNet
mean / std; queries cropped to their ``bbx`` (the revisitop protocol) unless
``--official`` (the paper's numbers). ``--multiscale``: the mean of the
features at scales 1, 1/sqrt(2) and 1/2 (bilinear, as PyTorch's
``interpolate(scale_factor=s)``). Rows are L2-normalized; ``sim = db @ q.T``
ranks the database best first for each query.

Metric: revisitop's mAP and mP@k (k = 1, 5, 10) on the Medium (ok = easy
and hard; junk) and Hard (ok = hard; junk and easy) protocols.
"""

import functools
import logging
import math
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dino_jax import interrupt
from dino_jax import workdir as workdir_lib
from dino_jax.data import multicrop
from dino_jax.evaluation import common, shards

logger = logging.getLogger(__name__)

DATASETS = ('roxford5k', 'rparis6k')
KS = (1, 5, 10)
SCALES = (1.0, 1 / 2 ** (1 / 2), 0.5)


# ---------------------------------------------------------------- the metric


def compute_ap(positions: np.ndarray, num_positives: int) -> float:
  """Average precision by the trapezoid rule (revisitop).

  Args:
    positions: sorted 0-based positions of the positives in the ranking,
      junk images already removed.
    num_positives: the query's number of positives (recall step 1 / n).

  Returns:
    AP in [0, 1].
  """
  positions = np.asarray(positions, np.float64)
  j = np.arange(len(positions), dtype=np.float64)
  # Precision just before and at each positive; 1 before a first-place hit.
  before = np.where(positions == 0, 1.0, j / np.maximum(positions, 1.0))
  at = (j + 1) / (positions + 1)
  return float(np.sum((before + at) / 2.0) / num_positives)


def compute_map(ranks: np.ndarray, gnd: list[dict], ks=()):
  """Mean average precision and mean precision at k (revisitop).

  Args:
    ranks: [database, queries] database indices, best first per query.
    gnd: one dict per query: ``ok`` (positive indices), ``junk`` (indices
      removed from the ranking; optional).
    ks: the k of mP@k.

  Returns:
    (mAP, APs [queries], mP@k [len(ks)], P@k [queries, len(ks)]). Queries
    without positives get NaN and are left out of the means; at each k the
    cut-off is kq = min(position of the last positive, k) (1-based).
  """
  ks = list(ks)
  num_queries = len(gnd)
  aps = np.full(num_queries, np.nan)
  prs = np.full((num_queries, len(ks)), np.nan)
  for i, g in enumerate(gnd):
    ok = np.asarray(g['ok']).ravel()
    if ok.size == 0:
      continue
    junk = np.asarray(g.get('junk', ())).ravel()
    column = np.asarray(ranks)[:, i]
    pos = np.flatnonzero(np.isin(column, ok))
    junk_pos = np.flatnonzero(np.isin(column, junk))
    # Each positive moves up by the junk images ranked above it.
    pos = pos - np.searchsorted(junk_pos, pos, side='left')
    aps[i] = compute_ap(pos, ok.size)
    if pos.size == 0:
      prs[i] = 0.0
      continue
    pos = pos + 1  # 1-based
    for j, k in enumerate(ks):
      kq = min(int(pos.max()), k)
      prs[i, j] = np.sum(pos <= kq) / kq
  valid = ~np.isnan(aps)
  count = int(valid.sum())
  if count == 0:
    return float('nan'), aps, np.full(len(ks), np.nan), prs
  mean_ap = float(np.sum(aps[valid]) / count)
  mean_pr = np.sum(prs[valid], axis=0) / count
  return mean_ap, aps, mean_pr, prs


def protocol_gnd(gnd: list[dict], protocol: str) -> list[dict]:
  """Medium: ok = easy + hard, junk = junk; Hard: ok = hard, junk + easy."""
  out = []
  for g in gnd:
    easy, hard, junk = (
      np.asarray(g[key], np.int64).ravel() for key in ('easy', 'hard', 'junk')
    )
    if protocol == 'medium':
      out.append({'ok': np.concatenate([easy, hard]), 'junk': junk})
    elif protocol == 'hard':
      out.append({'ok': hard, 'junk': np.concatenate([junk, easy])})
    else:
      raise ValueError(f'protocol must be medium or hard, not {protocol!r}')
  return out


def rank(db_features: np.ndarray, query_features: np.ndarray) -> np.ndarray:
  """[database, queries] database indices, most similar first."""
  sim = (
    np.asarray(db_features, np.float64)
    @ np.asarray(query_features, np.float64).T
  )
  return np.argsort(-sim, axis=0, kind='stable')


def evaluate(ranks: np.ndarray, gnd: list[dict], ks=KS) -> dict:
  """{'medium'|'hard': {'map': %, 'mp@k': %, 'aps': [%]}} of ``ranks``."""
  results = {}
  for protocol in ('medium', 'hard'):
    mean_ap, aps, mean_pr, _ = compute_map(
      ranks, protocol_gnd(gnd, protocol), ks
    )
    results[protocol] = {
      'map': 100.0 * mean_ap,
      **{f'mp@{k}': 100.0 * float(p) for k, p in zip(ks, mean_pr, strict=True)},
      'aps': [None if np.isnan(a) else 100.0 * float(a) for a in aps],
    }
  return results


# --------------------------------------------------------------- the features


def load_image(
  path: str, imsize: int, bbx=None, resample=Image.Resampling.LANCZOS
) -> np.ndarray:
  """float32 [H, W, 3] normalized: crop to ``bbx``, thumbnail, mean / std.

  ``thumbnail((imsize, imsize))`` keeps the aspect ratio and never upscales
  (the official code's ``Image.ANTIALIAS`` is Lanczos).
  """
  try:
    with Image.open(path) as f:
      image = f.convert('RGB')
  except (OSError, ValueError) as e:
    raise workdir_lib.WorkdirError(
      f'cannot read {path} ({e}); replace or re-download it'
    ) from e
  if bbx is not None:
    image = image.crop(tuple(float(v) for v in bbx))
  image.thumbnail((imsize, imsize), resample)
  x = np.asarray(image, np.float32) / 255.0
  return (x - np.array(multicrop.MEAN, np.float32)) / np.array(
    multicrop.STD, np.float32
  )


def resize_bilinear(images: jax.Array, scale: float) -> jax.Array:
  """[B, H, W, C] at ``scale`` as PyTorch ``interpolate(scale_factor=s,
  mode='bilinear', align_corners=False)``: size floor(H * s), source pixel
  (x + 0.5) / s - 0.5 (the factor itself, not size / new size), no
  antialiasing."""
  b, h, w, c = images.shape
  out = (b, math.floor(h * scale), math.floor(w * scale), c)
  return jax.image.scale_and_translate(
    images,
    out,
    spatial_dims=(1, 2),
    scale=jnp.array([scale, scale], images.dtype),
    translation=jnp.zeros(2, images.dtype),
    method='linear',
    antialias=False,
  )


def _normalize_rows(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.cache
def feature_fn(model, multiscale: bool):
  """jit ``(params, images [B, H, W, 3]) -> [B, D]`` L2-normalized CLS.

  Multi-scale: the mean of the CLS at scales 1, 1/sqrt(2), 1/2, then L2 per
  row (the official code divides by the norm of the whole batch).
  """

  def cls(params, x):
    return model.apply({'params': params}, x).astype(jnp.float32)

  def fn(params, images):
    images = images.astype(jnp.float32)
    if not multiscale:
      return _normalize_rows(cls(params, images))
    total = sum(
      cls(params, images if s == 1.0 else resize_bilinear(images, s))
      for s in SCALES
    )
    return _normalize_rows(total / len(SCALES))

  return jax.jit(fn)


def extract(
  model,
  params,
  paths: list[str],
  imsize: int,
  *,
  multiscale: bool = False,
  boxes=None,
) -> np.ndarray:
  """[len(paths), D] L2-normalized features, one image at a time.

  Several processes: each extracts its share (every ``process_count``-th
  image, with ``params`` usable on its own: ``shards.local_params``) and
  the rows are gathered with their indices; every process gets them all.
  """
  fn = feature_fn(model, multiscale)
  mine = shards.share(len(paths))
  rows, failure = [], None
  for done, i in enumerate(mine):
    interrupt.check()  # a signal stops the extraction between images
    bbx = None if boxes is None else boxes[i]
    try:
      x = load_image(paths[i], imsize, bbx)
    except workdir_lib.WorkdirError as e:  # raised on every process
      failure = e
      break
    rows.append(np.asarray(fn(params, jnp.asarray(x[None]))[0], np.float32))
    if (done + 1) % 500 == 0:
      logger.info('retrieval: %d / %d images', done + 1, len(mine))
  rows = np.stack(rows) if rows else np.zeros((0, 0), np.float32)
  return shards.gather_rows(mine[: len(rows)], rows, len(paths), failure)


# -------------------------------------------------------------------- the data


def load_dataset(data_root: str, dataset: str) -> dict:
  """The ground-truth pickle, with ``db_paths`` and ``query_paths`` added.

  Raises:
    WorkdirError: a missing root, dataset folder, pickle or image, or a
      pickle without the revisitop keys.
  """
  if not data_root:
    raise workdir_lib.WorkdirError(
      '--data_root is required; pass the folder holding roxford5k/ and '
      'rparis6k/ (docs/retrieval.md)'
    )
  if not os.path.isdir(data_root):
    raise workdir_lib.WorkdirError(
      f'--data_root={data_root} is not a directory; pass the folder holding '
      f'{dataset}/ (docs/retrieval.md)'
    )
  folder = os.path.join(data_root, dataset)
  if not os.path.isdir(folder):
    raise workdir_lib.WorkdirError(
      f'{folder} does not exist: --data_root={data_root} has no {dataset}/ '
      'folder; download it (docs/retrieval.md)'
    )
  gnd_path = os.path.join(folder, f'gnd_{dataset}.pkl')
  if not os.path.isfile(gnd_path):
    raise workdir_lib.WorkdirError(
      f'{gnd_path} does not exist; download gnd_{dataset}.pkl into '
      f'{folder} (docs/retrieval.md)'
    )
  try:
    with open(gnd_path, 'rb') as f:
      cfg = pickle.load(f)
    missing = {'imlist', 'qimlist', 'gnd'} - set(cfg)
  except Exception as e:  # noqa: BLE001 - any unreadable pickle
    raise workdir_lib.WorkdirError(
      f'cannot read {gnd_path} ({e}); download it again'
    ) from e
  if missing:
    raise workdir_lib.WorkdirError(
      f'{gnd_path} lacks {sorted(missing)}; download the revisitop '
      'gnd_*.pkl again'
    )
  if len(cfg['gnd']) != len(cfg['qimlist']):
    raise workdir_lib.WorkdirError(
      f'{gnd_path}: {len(cfg["gnd"])} gnd entries for '
      f'{len(cfg["qimlist"])} queries; download it again'
    )
  images = os.path.join(folder, 'jpg')
  cfg['db_paths'] = [os.path.join(images, f'{n}.jpg') for n in cfg['imlist']]
  cfg['query_paths'] = [
    os.path.join(images, f'{n}.jpg') for n in cfg['qimlist']
  ]
  absent = [
    p for p in cfg['db_paths'] + cfg['query_paths'] if not os.path.isfile(p)
  ]
  if absent:
    more = f' and {len(absent) - 3} more' if len(absent) > 3 else ''
    raise workdir_lib.WorkdirError(
      f'{len(absent)} images of {dataset} are missing: '
      f'{", ".join(absent[:3])}{more}; download jpg/ (docs/retrieval.md)'
    )
  return cfg


def retrieval_eval(
  model,
  params,
  cfg: dict,
  imsize: int,
  *,
  multiscale: bool = False,
  crop_queries: bool = True,
) -> tuple[dict, np.ndarray, np.ndarray]:
  """(results of ``evaluate``, database features, query features)."""
  db = extract(model, params, cfg['db_paths'], imsize, multiscale=multiscale)
  boxes = [g['bbx'] for g in cfg['gnd']] if crop_queries else None
  queries = extract(
    model,
    params,
    cfg['query_paths'],
    imsize,
    multiscale=multiscale,
    boxes=boxes,
  )
  return evaluate(rank(db, queries), cfg['gnd']), db, queries


def check_imsize(imsize: int, what: str = '--imsize') -> None:
  if imsize < 1:
    raise workdir_lib.WorkdirError(
      f'{what}={imsize} must be a positive number of pixels '
      '(224 for roxford5k, 512 for rparis6k)'
    )


def retrieval_evaluation(
  config,
  mesh,
  backbone,
  params,
  *,
  data_root: str,
  dataset: str,
  imsize: int = 224,
  multiscale: bool = False,
  official: bool = False,
) -> dict:
  """The evaluation of a backbone on one dataset: its record.

  The interface every evaluation shares: the CLI and
  ``evaluation.run.after_training`` (``eval.retrieval_root``) call it alike, on
  any number of processes (each extracts its share of the images).

  Args:
    config: the run's config (a ViT: ``model.arch``; the options come as
      arguments).
    mesh: the device mesh ``params`` live on.
    backbone: the ViT backbone module.
    params: its parameters (any sharding over ``mesh``).
    data_root: the folder holding ``<dataset>/``.
    dataset: 'roxford5k' or 'rparis6k'.
    imsize: ``thumbnail((imsize, imsize))``.
    multiscale: the mean of the features at 3 scales.
    official: queries uncropped (the paper's numbers).

  Returns:
    {'dataset', 'imsize', 'multiscale', 'official', 'queries_cropped',
    'num_database', 'num_queries', 'medium': {...}, 'hard': {...}} with the
    mAP and mP@k in percent (``evaluate``).

  Raises:
    WorkdirError: bad data or options (one line naming them).
  """
  common.require_vit(config, 'retrieval')
  if dataset not in DATASETS:
    raise workdir_lib.WorkdirError(
      f'dataset {dataset!r} is not one of {", ".join(DATASETS)}'
    )
  check_imsize(imsize)
  cfg = load_dataset(data_root, dataset)
  results, _, _ = retrieval_eval(
    backbone,
    shards.local_params(mesh, params),
    cfg,
    imsize,
    multiscale=multiscale,
    crop_queries=not official,
  )
  return {
    'dataset': dataset,
    'imsize': imsize,
    'multiscale': multiscale,
    'official': official,
    'queries_cropped': not official,
    'num_database': len(cfg['imlist']),
    'num_queries': len(cfg['qimlist']),
    **results,
  }


def format_results(dataset: str, results: dict, step: int) -> str:
  m, h = results['medium'], results['hard']
  mp = lambda r: ' '.join(f'{r[f"mp@{k}"]:.2f}' for k in KS)  # noqa: E731
  return '\n'.join(
    [
      f'{dataset} (step {step}): mAP M: {m["map"]:.2f}, H: {h["map"]:.2f}',
      f'{dataset}: mP@k{list(KS)} M: {mp(m)}, H: {mp(h)}',
    ]
  )


# --------------------------------------------------------------------- the CLI
