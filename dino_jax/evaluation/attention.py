"""CLS attention maps and masks (SPEC §7.3, SPEC-downstream §4).

CLI: ``python -m dino_jax.eval.attention --workdir=DIR --image=PATH
[--threshold=0.6]`` (``--config.a.b=c`` overrides the saved config's
eval/data/mesh fields).

Per head: the last block's CLS -> patch attention, reshaped row-major to
the patch grid; the mask (``masks``) keeps the smallest set of patches
holding ``threshold`` of the mass, ties broken by row-major order. Maps and
masks are upsampled by nearest with factor p and written as PNGs.
``mask_jaccard_eval`` scores the masks against object silhouettes (the
paper's Fig. 4; ``benchmarks/mask_jaccard.py`` on Fashion-MNIST).
"""

import io
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from PIL import Image

from dino_jax import interrupt, parallel, storage
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib
from dino_jax.data import multicrop
from dino_jax.evaluation import common, features

# A small perceptual colour map (dark blue -> magenta -> orange -> yellow).
_ANCHORS = np.array(
  [[0, 0, 4], [80, 18, 123], [182, 54, 121], [251, 136, 97], [252, 253, 191]],
  np.float64,
)


def colorize(values: np.ndarray) -> np.ndarray:
  """[H, W] in [0, 1] -> uint8 [H, W, 3]."""
  pos = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
  lo = np.floor(pos).astype(int).clip(0, len(_ANCHORS) - 2)
  t = (pos - lo)[..., None]
  return ((1 - t) * _ANCHORS[lo] + t * _ANCHORS[lo + 1]).astype(np.uint8)


def cls_attention_batch(
  model, params, images: np.ndarray, patch_size: int, mesh: Mesh | None = None
) -> np.ndarray:
  """Per-head CLS attention over the patch grid, for a batch of images.

  With a mesh, every process calls this with the same images (a collective):
  the batch is padded to a multiple of the device count, split over the
  devices, and the maps gathered to every process.

  Args:
    model: the ViT backbone module.
    params: its params (on ``mesh``, in any sharding; or local arrays).
    images: float32 [B, H, W, 3] normalized; cropped to multiples of p here.
    patch_size: p.
    mesh: the device mesh the params live on; None: local arrays.

  Returns:
    float32 [B, heads, H // p, W // p], each head summing to <= 1.
  """
  b = images.shape[0]
  h, w = images.shape[1] // patch_size, images.shape[2] // patch_size
  images = np.asarray(images[:, : h * patch_size, : w * patch_size])
  fn = features.jit_feature_fn(model, mesh, 'attention')
  if mesh is None:
    attn = np.asarray(fn(params, jnp.asarray(images)))
  else:
    pad = -b % mesh.devices.size
    images = np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0)))
    sharded = jax.make_array_from_callback(
      images.shape, parallel.batch_sharding(mesh), lambda i: images[i]
    )
    attn = features.gather(mesh, fn(params, sharded))[:b]
  return attn.reshape(b, -1, h, w)  # [B, heads, N] -> the patch grid


def cls_attention(
  model, params, image: np.ndarray, patch_size: int, mesh: Mesh | None = None
) -> np.ndarray:
  """``cls_attention_batch`` of one image [H, W, 3]: [heads, H/p, W/p]."""
  return cls_attention_batch(model, params, image[None], patch_size, mesh)[0]


def masks(
  attn: np.ndarray, threshold: float, patch_size: int = 1
) -> np.ndarray:
  """Per head, the smallest set of patches holding ``threshold`` of the mass.

  The definition, exactly: each head's map (the last two axes, flattened
  row-major) is sorted by attention, descending; equal values keep their
  row-major order (a stable sort: of tied patches, the earlier one is
  kept first). The sorted values are normalised by the head's sum, and a
  patch is kept when the mass of the patches before it is below
  ``threshold``: the shortest prefix holding >= ``threshold``. In exact
  arithmetic that is the official ``visualize_attention.py`` rule (ascending
  sort, normalise, cumsum, keep ``cumsum > 1 - threshold``), whose unstable
  sort leaves ties to chance. Sums are float64 here; the official code's
  float32 can differ only for a patch whose cumulative mass lies within
  float32 rounding of the threshold.

  Args:
    attn: [..., h, w] non-negative (e.g. [heads, h, w]).
    threshold: fraction of each head's mass to keep, in [0, 1] (paper: 0.6);
      0 keeps nothing, 1 every patch with attention > 0.
    patch_size: nearest upsampling factor (the patch size p): each patch
      becomes a p x p block.

  Returns:
    bool [..., h * patch_size, w * patch_size].
  """
  if not 0 <= threshold <= 1:
    raise ValueError(f'threshold={threshold} is outside [0, 1]')
  attn = np.asarray(attn, np.float64)
  flat = attn.reshape(*attn.shape[:-2], -1)
  order = np.argsort(-flat, axis=-1, kind='stable')  # descending, stable
  desc = np.take_along_axis(flat, order, axis=-1)
  desc = desc / np.maximum(desc.sum(axis=-1, keepdims=True), 1e-300)
  before = np.cumsum(desc, axis=-1) - desc  # the mass ranked above
  keep_sorted = before < threshold
  if threshold == 1:  # every patch with mass (no rounding near 1)
    keep_sorted = desc > 0
  keep = np.zeros_like(keep_sorted)
  np.put_along_axis(keep, order, keep_sorted, axis=-1)
  keep = keep.reshape(attn.shape)
  if patch_size > 1:
    keep = np.repeat(np.repeat(keep, patch_size, -2), patch_size, -1)
  return keep


def attention_mask(attn: np.ndarray, threshold: float) -> np.ndarray:
  """``masks`` on the patch grid: bool [heads, h, w] for [heads, h, w]."""
  return masks(attn, threshold)


def jaccard(mask: np.ndarray, silhouette: np.ndarray) -> float:
  """Intersection over union of two boolean masks of one shape.

  Two empty masks agree entirely: 1.0.
  """
  mask, silhouette = np.asarray(mask, bool), np.asarray(silhouette, bool)
  if mask.shape != silhouette.shape:
    raise ValueError(f'mask {mask.shape} and silhouette {silhouette.shape}')
  union = np.logical_or(mask, silhouette).sum()
  if union == 0:
    return 1.0
  return float(np.logical_and(mask, silhouette).sum() / union)


def best_head_jaccard(masks_: np.ndarray, silhouettes: np.ndarray) -> float:
  """Per image the best head's Jaccard, averaged over the images.

  Args:
    masks_: bool [B, heads, H, W] (``masks`` upsampled to the pixels).
    silhouettes: bool [B, H, W].

  Returns:
    The mean over images of the maximum over heads, in [0, 1].
  """
  scores = [
    max(jaccard(m, s) for m in heads)
    for heads, s in zip(masks_, silhouettes, strict=True)
  ]
  return float(np.mean(scores))


def mask_jaccard_eval(
  config, mesh, backbone, params, images: np.ndarray, silhouettes: np.ndarray
) -> float:
  """The paper's Fig. 4 score: best head's mask vs the object's silhouette.

  Per image, each head's mask at ``config.eval.attention_threshold`` of the
  last block's CLS attention (``masks``, upsampled by p) is compared with
  the silhouette by Jaccard; the best head counts; the mean over images is
  returned. Every process calls this with the same images (a collective,
  see ``cls_attention_batch``).

  Args:
    config: the run's config (model.patch_size, eval.batch_size,
      eval.attention_threshold).
    mesh: the device mesh of ``params`` (None: local arrays).
    backbone, params: the ViT and its params (teacher or random init).
    images: float32 [B, H, W, 3] normalized.
    silhouettes: bool [B, H, W] (e.g. Fashion-MNIST pixels > 0); cropped
      with the images to multiples of p.

  Returns:
    The mean best-head Jaccard in [0, 1].
  """
  p = config.model.patch_size
  h, w = images.shape[1] // p * p, images.shape[2] // p * p
  if not len(images):
    raise ValueError('no images to score')
  if silhouettes.shape != images.shape[:3]:
    raise ValueError(
      f'silhouettes {silhouettes.shape} do not match images {images.shape}'
    )
  batch = max(1, config.eval.batch_size)
  threshold = config.eval.attention_threshold
  scores = []
  for start in range(0, len(images), batch):
    interrupt.check()
    attn = cls_attention_batch(
      backbone, params, images[start : start + batch], p, mesh
    )
    keep = masks(attn, threshold, p)
    sil = silhouettes[start : start + batch, :h, :w]
    scores.append(best_head_jaccard(keep, sil) * len(keep))
  return float(sum(scores) / len(images))


def denormalize(image: np.ndarray) -> np.ndarray:
  """Normalized float [H, W, 3] -> uint8."""
  x = image * np.array(multicrop.STD) + np.array(multicrop.MEAN)
  return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def save_maps(
  image: np.ndarray,
  attn: np.ndarray,
  mask: np.ndarray,
  patch_size: int,
  out_dir: str,
  prefix: str = 'attn',
  binary: bool = False,
) -> list[str]:
  """Writes one PNG per head (map and masked image) and an overview.

  Args:
    image: uint8 [H, W, 3] (H, W multiples of p).
    attn: [heads, h, w].
    mask: bool [heads, h, w].
    patch_size: nearest upsampling factor p.
    out_dir: output directory.
    prefix: file name prefix.
    binary: also the masks themselves, ``{prefix}-binmask{i}.png``: 8-bit
      grey, 255 where kept, 0 elsewhere, upsampled by p.

  Returns:
    paths written; the last is ``{prefix}-overview.png``.
  """
  storage.makedirs(out_dir)
  up = lambda a: np.repeat(np.repeat(a, patch_size, -2), patch_size, -1)
  h, w = attn.shape[1] * patch_size, attn.shape[2] * patch_size
  image = image[:h, :w]
  paths, tiles, masked_tiles = [], [image], [image]
  for i, (a, m) in enumerate(zip(attn, mask, strict=True)):
    heat = colorize(up(a / max(a.max(), 1e-12)))
    overlay = image.astype(np.float64)
    color = np.array([255.0, 64.0, 32.0])
    overlay = np.where(
      up(m)[..., None], 0.45 * overlay + 0.55 * color, 0.6 * overlay
    ).astype(np.uint8)
    for name, pic in (('head', heat), ('mask', overlay)):
      path = storage.join(out_dir, f'{prefix}-{name}{i}.png')
      _save_png(pic, path)
      paths.append(path)
    if binary:
      path = storage.join(out_dir, f'{prefix}-binmask{i}.png')
      _save_png(up(m).astype(np.uint8) * 255, path)
      paths.append(path)
    tiles.append(heat)
    masked_tiles.append(overlay)
  overview = np.concatenate(
    [np.concatenate(tiles, 1), np.concatenate(masked_tiles, 1)], 0
  )
  scale = max(1, 96 // h)  # small images are enlarged to stay visible
  overview = np.repeat(np.repeat(overview, scale, 0), scale, 1)
  path = storage.join(out_dir, f'{prefix}-overview.png')
  _save_png(overview, path)
  paths.append(path)
  return paths


def attention_for_image(
  model,
  params,
  image: np.ndarray,
  patch_size: int,
  threshold: float,
  out_dir: str,
  prefix: str,
  mesh: Mesh | None = None,
  binary: bool = False,
) -> list[str]:
  """Maps and masks for one normalized image [H, W, 3]; returns the paths."""
  return attention_maps(
    model,
    params,
    image[None],
    patch_size,
    threshold,
    out_dir,
    [prefix],
    mesh,
    binary,
  )


def attention_maps(
  model,
  params,
  images: np.ndarray,
  patch_size: int,
  threshold: float,
  out_dir: str,
  prefixes: list[str],
  mesh: Mesh | None = None,
  binary: bool = False,
) -> list[str]:
  """Maps and masks of a batch of normalized images [B, H, W, 3].

  Every process takes part (the same images on each, see
  ``cls_attention_batch``); process 0 writes the PNGs (``binary``: the
  bare masks too, see ``save_maps``).

  Returns:
    The paths written (process 0; the others return []).
  """
  attn = cls_attention_batch(model, params, images, patch_size, mesh)
  if jax.process_index() != 0:
    return []
  paths = []
  for image, a, prefix in zip(images, attn, prefixes, strict=True):
    mask = masks(a, threshold)
    paths += save_maps(
      denormalize(image), a, mask, patch_size, out_dir, prefix, binary
    )
  return paths


def _save_png(pixels: np.ndarray, path: str) -> None:
  """One PNG, written whole (a local file or an object, ``storage``)."""
  data = io.BytesIO()
  Image.fromarray(pixels).save(data, format='PNG')
  storage.write_bytes(path, data.getvalue())


def load_image(path: str, image_size: int, patch_size: int) -> np.ndarray:
  """File -> normalized float32 [S', S', 3], resized to image_size square,
  cropped to a multiple of p (visualize_attention.py defaults)."""
  try:
    image = Image.open(io.BytesIO(storage.as_path(path).read_bytes()))
    image = image.convert('RGB')
  except (OSError, SyntaxError, ValueError) as e:  # PIL's decode errors
    raise workdir_lib.WorkdirError(
      f'--image={path} is not an image PIL can read ({type(e).__name__}); '
      'pass a JPEG or PNG file'
    ) from None
  image = image.resize((image_size, image_size), Image.BICUBIC)
  x = (np.asarray(image, np.float32) / 255.0 - np.array(multicrop.MEAN)) / (
    np.array(multicrop.STD)
  )
  s = image_size - image_size % patch_size
  return x[:s, :s].astype(np.float32)


def attention_from_workdir(
  workdir: str,
  image_path: str,
  image_size: int = 0,
  threshold: float = 0.6,
  output_dir: str | None = None,
  overrides: list[str] = (),
) -> list[str]:
  """Maps of the teacher backbone in ``workdir`` for one image file.

  ``image_size`` 0: the config's ``eval.attention_size``, else its
  ``eval.crop_size`` (the size the model was evaluated at).
  """
  if not storage.as_path(image_path).is_file():
    raise workdir_lib.WorkdirError(
      f'--image={image_path} is not a file; pass an image file'
    )
  config, mesh, state, _ = workdir_lib.load_workdir(workdir, overrides)
  common.require_vit(config, 'attention maps')
  _, teacher = step_lib.build_models(config)
  p = config.model.patch_size
  image_size = image_size or config.eval.attention_size or config.eval.crop_size
  if image_size < p:
    raise workdir_lib.ConfigOverrideError(
      f'--image_size={image_size} is smaller than the patch size {p}; pass '
      f"a size of at least {p} (0: the config's eval.attention_size)"
    )
  print(
    f'attention maps at {image_size} x {image_size} pixels', file=sys.stderr
  )
  image = load_image(image_path, image_size, p)
  out = output_dir or storage.join(workdir, 'eval', 'attention')
  stem = storage.as_path(image_path).stem
  return attention_for_image(
    teacher.backbone,
    state.teacher['backbone'],
    image,
    p,
    threshold,
    out,
    stem,
    mesh,
    binary=True,
  )
