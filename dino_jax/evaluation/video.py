"""DAVIS 2017 video object segmentation by label propagation (SPEC §3).

CLI: ``python -m dino_jax.eval.video --workdir=DIR --davis_root=DAVIS``
(``--split=val --n_last_frames=7 --size_mask_neighborhood=12 --topk=5``;
``--official`` for the official code's std typo and one-hot depth).

Each frame's patch tokens (last block, final norm, CLS dropped,
L2-normalised) are compared with those of the first frame and of the
``n_last_frames`` previous ones: affinity exp(cos / 0.1) within a
(2r + 1)^2 patch window, the top ``topk`` kept per target patch over all
context patches, normalised, and the context labels (the first frame's
one-hot, the others' soft predictions) averaged with those weights; all on
device. Predictions go to DIR/eval/davis/<seq>/<frame>.png (indexed, the
first annotation's palette); J, F and J&F to DIR/eval/davis.json.
"""

import collections
import functools
import io
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dino_jax import interrupt
from dino_jax import workdir as workdir_lib
from dino_jax.data import multicrop
from dino_jax.evaluation import common, davis_metrics, shards

logger = logging.getLogger(__name__)

OFFICIAL_STD = (0.228, 0.224, 0.225)  # eval_video_segmentation.py's typo
_HIGHEST = jax.lax.Precision.HIGHEST


def neighborhood_mask(h: int, w: int, size: int) -> jax.Array:
  """[h * w, h * w] float32: 1 where |drow|, |dcol| <= size (row-major)."""
  rows = jnp.repeat(jnp.arange(h), w)
  cols = jnp.tile(jnp.arange(w), h)
  near_rows = jnp.abs(rows[:, None] - rows[None, :]) <= size
  near_cols = jnp.abs(cols[:, None] - cols[None, :]) <= size
  return (near_rows & near_cols).astype(jnp.float32)


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / max(||x||, 1e-12) over the last axis (torch F.normalize)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, 1e-12)


@functools.partial(jax.jit, static_argnames=('topk',))
def propagate(
  target: jax.Array,
  context_feats: jax.Array,
  context_segs: jax.Array,
  mask: jax.Array | None,
  topk: int,
) -> jax.Array:
  """Labels of the target frame from its context frames.

  Args:
    target: [N, D] the target's patch features (normalised here).
    context_feats: [K, N, D] the context frames' features (normalised
      here).
    context_segs: [K, N, C] their labels (one-hot or soft).
    mask: [N, N] (target x source) 0/1 neighbourhood, or None (all).
    topk: sources kept per target patch, over all K * N. Ties with the
      k-th affinity: the official code keeps them all, this exactly k (the
      same for distinct affinities).

  Returns:
    [N, C] float32 soft labels.
  """
  target = l2_normalize(target.astype(jnp.float32))
  context_feats = l2_normalize(context_feats.astype(jnp.float32))
  k, n, d = context_feats.shape
  # One GEMM: [N target, K * N sources], sources context-major.
  cos = jnp.matmul(
    target, context_feats.reshape(k * n, d).T, precision=_HIGHEST
  )
  if mask is not None:
    cos = jnp.where(jnp.tile(mask, (1, k)) > 0, cos, -jnp.inf)
  # exp(cos / 0.1) is increasing: the top k of the cosines are those of the
  # affinities, and only those k need the exp. Masked sources (official:
  # affinity 0) get weight 0 where fewer than k are in the window.
  best, index = jax.lax.top_k(cos, topk)
  weights = jnp.where(best > -jnp.inf, jnp.exp(best / 0.1), 0.0)
  weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  segs = context_segs.astype(jnp.float32).reshape(k * n, -1)
  return jnp.einsum('tj,tjc->tc', weights, segs[index], precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames=('patch',))
def upsample_labels(seg: jax.Array, patch: int) -> jax.Array:
  """[h, w, C] soft labels -> [h * p, w * p] int32: bilinear x p
  (align_corners=False), per-channel min-max, argmax."""
  h, w, c = seg.shape
  up = jax.image.resize(
    seg, (h * patch, w * patch, c), 'linear', antialias=False
  )
  lo = up.min(axis=(0, 1))
  hi = up.max(axis=(0, 1))
  span = hi - lo
  scaled = (up - lo) / jnp.where(span > 0, span, 1.0)
  up = jnp.where(hi > 0, scaled, up)
  return jnp.argmax(up, axis=-1).astype(jnp.int32)


def frame_size(h: int, w: int, size: int) -> tuple[int, int]:
  """(height, width): short side ``size``, the long one floored to a
  multiple of 64 (the official read_frame)."""
  if h > w:
    return int((size * h / w) // 64 * 64), size
  return size, int((size * w / h) // 64 * 64)


@functools.partial(jax.jit, static_argnames=('shape',))
def _resize_normalize(image, shape, mean, std):
  x = jax.image.resize(
    image.astype(jnp.float32) / 255.0,
    (*shape, 3),
    'linear',
    antialias=False,
  )  # cv2.resize's INTER_LINEAR: half-pixel centres, no antialiasing
  return (x - mean) / std


def read_frame(path: str, size: int, std=multicrop.STD) -> tuple:
  """(normalised float32 [H', W', 3], original (h, w))."""
  with Image.open(path) as im:
    rgb = np.asarray(im.convert('RGB'))
  h, w = rgb.shape[:2]
  shape = frame_size(h, w, size)
  x = _resize_normalize(
    rgb, shape, jnp.array(multicrop.MEAN), jnp.array(std, jnp.float32)
  )
  return x, (h, w)


def first_labels(
  path: str, grid: tuple[int, int], official: bool = False
) -> tuple[np.ndarray, np.ndarray, list]:
  """The first annotation: (one-hot [h, w, C] on the patch grid, the
  full-resolution labels, the palette).

  The grid labels are a nearest resize; the depth C is the largest label
  of the full-resolution mask + 1 (``official``: of the resized one, which
  drops objects smaller than a patch).
  """
  with Image.open(path) as im:
    if im.mode != 'P':
      raise workdir_lib.WorkdirError(
        f'{path} is a {im.mode} image; the first annotation must be an '
        'indexed (palette) PNG, as DAVIS ships them'
      )
    palette = im.getpalette()
    full = np.asarray(im)
    small = np.asarray(im.resize((grid[1], grid[0]), Image.NEAREST))
  depth = int((small if official else full).max()) + 1
  return np.eye(depth, dtype=np.float32)[small], full, palette


def indexed_png(labels: np.ndarray, palette: list) -> bytes:
  im = Image.fromarray(labels.astype(np.uint8), mode='P')
  im.putpalette(palette)
  out = io.BytesIO()
  im.save(out, format='PNG')
  return out.getvalue()


def make_feature_fn(backbone, params):
  @jax.jit
  def fn(params, image):
    tokens = backbone.apply({'params': params}, image[None], method='features')
    return tokens[0, 1:].astype(jnp.float32)

  return lambda image: fn(params, image)


def segment_video(
  feature_fn,
  frames: list[str],
  first_annotation: str,
  patch: int,
  *,
  size: int = 480,
  n_last_frames: int = 7,
  size_mask_neighborhood: int = 12,
  topk: int = 5,
  official: bool = False,
  write=None,
) -> tuple[list[np.ndarray], list]:
  """Labels of every frame (the first is its annotation) and the palette.

  ``write(name, png_bytes)`` receives each frame's indexed PNG.
  """
  std = OFFICIAL_STD if official else multicrop.STD
  image, _ = read_frame(frames[0], size, std)
  grid = (image.shape[0] // patch, image.shape[1] // patch)
  onehot, full, palette = first_labels(first_annotation, grid, official)
  first_seg = jnp.asarray(onehot.reshape(grid[0] * grid[1], -1))
  first_feat = feature_fn(image)
  mask = None
  if size_mask_neighborhood > 0:
    mask = neighborhood_mask(*grid, size_mask_neighborhood)
  name = lambda f: os.path.splitext(os.path.basename(f))[0] + '.png'  # noqa: E731
  if write:
    write(name(frames[0]), indexed_png(full, palette))
  labels = [full]
  queue = collections.deque(maxlen=n_last_frames)
  for path in frames[1:]:
    interrupt.check()
    image, (h, w) = read_frame(path, size, std)
    feat = feature_fn(image)
    feats = jnp.stack([first_feat] + [f for f, _ in queue])
    segs = jnp.stack([first_seg] + [s for _, s in queue])
    seg = propagate(feat, feats, segs, mask, topk)
    queue.append((feat, seg))
    small = np.asarray(upsample_labels(seg.reshape(*grid, -1), patch))
    out = Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.NEAREST)
    out = np.asarray(out)
    labels.append(out)
    if write:
      write(name(path), indexed_png(out, palette))
  return labels, palette


def list_videos(davis_root: str, split: str) -> dict:
  """{sequence: (frame paths, annotation paths)}; checks every path."""
  if not os.path.isdir(davis_root):
    raise workdir_lib.WorkdirError(
      f'--davis_root={davis_root} is not a directory; pass the DAVIS folder '
      '(holding ImageSets/2017, JPEGImages/480p, Annotations/480p)'
    )
  listing = os.path.join(davis_root, 'ImageSets', '2017', f'{split}.txt')
  if not os.path.isfile(listing):
    raise workdir_lib.WorkdirError(
      f'--split={split}: no {listing}; pass a split listed in '
      f'{os.path.join(davis_root, "ImageSets", "2017")}'
    )
  with open(listing) as f:
    names = [line.strip() for line in f if line.strip()]
  if not names:
    raise workdir_lib.WorkdirError(f'{listing} lists no sequence')
  videos = {}
  for seq in names:
    folder = os.path.join(davis_root, 'JPEGImages', '480p', seq)
    frames = sorted(
      os.path.join(folder, f)
      for f in (os.listdir(folder) if os.path.isdir(folder) else [])
      if f.endswith('.jpg')
    )
    if not frames:
      raise workdir_lib.WorkdirError(
        f'sequence {seq}: no .jpg frames in {folder}; check --davis_root'
      )
    annotations = [
      f.replace(os.path.join('JPEGImages', '480p'), 'Annotations/480p')[:-4]
      + '.png'
      for f in frames
    ]
    missing = [a for a in annotations if not os.path.isfile(a)]
    if missing:
      raise workdir_lib.WorkdirError(
        f'sequence {seq}: no annotation {missing[0]} (every frame needs '
        'one for scoring); check --davis_root'
      )
    videos[seq] = (frames, annotations)
  return videos


def check_grids(videos: dict, size: int, patch: int, topk: int) -> None:
  """Every sequence's patch grid holds at least ``topk`` patches."""
  for seq, (frames, _) in videos.items():
    with Image.open(frames[0]) as im:
      w, h = im.size
    fh, fw = frame_size(h, w, size)
    if (fh // patch) * (fw // patch) < topk:
      raise workdir_lib.ConfigOverrideError(
        f'--size={size}: sequence {seq} ({w}x{h}) becomes {fw}x{fh}, '
        f'fewer than --topk={topk} patches of {patch}; pass a larger --size'
      )


def read_labels(path: str) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im)


def evaluate(
  feature_fn, videos: dict, patch: int, write=None, **options
) -> dict:
  """Segments and scores every sequence; {'J', 'F', 'J&F', 'sequences'}.

  Several processes: each segments its share of the sequences (every
  ``process_count``-th); the scores and the PNGs are gathered, so every
  process returns all the scores, and ``write(relative path, png bytes)``
  gets every frame, in sequence order, once all are done (nothing
  partial). A sequence that fails on one process fails every process.
  """
  names = list(videos)
  mine = shards.share(len(names))
  done, failure = {}, None
  for i in mine:
    seq = names[i]
    frames, annotations = videos[seq]
    logger.info('segmenting %s (%d frames)', seq, len(frames))
    pngs = []
    try:
      labels, _ = segment_video(
        feature_fn,
        frames,
        annotations[0],
        patch,
        write=lambda n, b, s=seq, out=pngs: out.append((f'{s}/{n}', b)),
        **options,
      )
      gt = np.stack([read_labels(a) for a in annotations])
    except (workdir_lib.WorkdirError, OSError) as e:  # on every process
      failure = e
      break
    done[seq] = (davis_metrics.sequence_scores(gt, np.stack(labels)), pngs)
  parts = shards.gather_objects((done, failure))
  shards.raise_first([f for _, f in parts])
  for part, _ in parts:
    done.update(part)
  if write:
    for seq in names:
      for relative, data in done[seq][1]:
        write(relative, data)
  per_sequence = {seq: done[seq][0] for seq in names}
  return {**davis_metrics.summarize(per_sequence), 'sequences': per_sequence}


def check_options(
  davis_root: str,
  size: int,
  n_last_frames: int,
  size_mask_neighborhood: int,
  topk: int,
) -> None:
  """Raises a one-line error for a bad option (named as its flag)."""
  checks = [
    ('size', size, 1),
    ('n_last_frames', n_last_frames, 0),
    ('size_mask_neighborhood', size_mask_neighborhood, 0),
    ('topk', topk, 1),
  ]
  for name, value, least in checks:
    if value < least:
      raise workdir_lib.ConfigOverrideError(
        f'--{name}={value} is below {least}; pass an integer >= {least}'
      )
  if not davis_root:
    raise workdir_lib.WorkdirError(
      '--davis_root is required; pass the DAVIS 2017 folder'
    )


def video_evaluation(
  config,
  mesh,
  backbone,
  params,
  *,
  davis_root: str,
  split: str = 'val',
  size: int = 480,
  n_last_frames: int = 7,
  size_mask_neighborhood: int = 12,
  topk: int = 5,
  official: bool = False,
  write=None,
) -> dict:
  """The evaluation of a backbone on DAVIS 2017: its record.

  The interface every evaluation shares: the CLI and
  ``evaluation.run.after_training`` (``eval.davis_root``) call it alike, on any
  number of processes (each segments its share of the sequences).

  Args:
    config: the run's config (its ``model.patch_size``).
    mesh: the device mesh ``params`` live on.
    backbone: the ViT backbone module.
    params: its parameters (any sharding over ``mesh``).
    davis_root: the DAVIS folder (ImageSets/2017, JPEGImages/480p,
      Annotations/480p).
    split: ImageSets/2017/<split>.txt.
    size: the frames' short side.
    n_last_frames: previous frames in the context.
    size_mask_neighborhood: window radius in patches (0: none).
    topk: sources kept per target patch.
    official: the official std typo and one-hot depth.
    write: ``write(relative path, png bytes)``, e.g. into
      WORKDIR/eval/davis/ (process 0); None: no PNGs.

  Returns:
    {'split', 'size', 'n_last_frames', 'size_mask_neighborhood', 'topk',
    'official', 'J', 'F', 'J&F' (in [0, 1]), 'sequences'}.

  Raises:
    WorkdirError, ConfigOverrideError: bad data or options (one line).
  """
  options = dict(
    size=size,
    n_last_frames=n_last_frames,
    size_mask_neighborhood=size_mask_neighborhood,
    topk=topk,
  )
  common.require_vit(config, 'video segmentation')
  check_options(davis_root, **options)
  videos = list_videos(davis_root, split)
  patch = config.model.patch_size
  check_grids(videos, size, patch, topk)
  feature_fn = make_feature_fn(backbone, shards.local_params(mesh, params))
  results = evaluate(
    feature_fn, videos, patch, write=write, official=official, **options
  )
  return {'split': split, **options, 'official': official, **results}


def format_results(record: dict, step: int) -> str:
  return (
    f'DAVIS {record["split"]} (step {step}): J {100 * record["J"]:.1f}  '
    f'F {100 * record["F"]:.1f}  J&F {100 * record["J&F"]:.1f}'
  )
