"""DINO multi-crop augmentation on device: jittable, vmapped, per-crop keys.

Input (from the host pipeline): ``image`` uint8 [B, C, C, 3], each image
placed top-left on a C x C canvas, and ``size`` int32 [B, 2] with its true
(height, width). Output:

  global_crops  float32 [2, B, G, G, 3]  (G = crops.global_size)
  local_crops   float32 [L, B, S, S, 3]  (S = crops.local_size)

normalized with the ImageNet mean and std. Semantics follow torchvision/PIL
(SPEC §5): RandomResizedCrop sampled from the true size (10 attempts, log-
uniform aspect, central fallback), antialiased bicubic (a = -0.5) resampling
that reads only pixels inside the crop box, then flip, colour jitter in random
order (PIL brightness/contrast/saturation, hue rotation), grayscale, PIL's
Gaussian blur (3 extended box passes per axis, edges extended, uint8 rounding
after each pass: PIL's output on uint8 input), solarization of the uint8 values
PIL would see. Ops work in float on the 0..255 scale and clip after each
op; brightness, contrast and saturation also truncate as PIL's Image.blend
does (their gray image rounded, as convert('L')). SPEC §5.4 accepted
deviations, by default: one float resize pass, no uint8 re-quantization after
it, after hue and after grayscale (``crops.uint8_rounding`` turns on PIL's two
rounded resize passes and the rounding after hue and grayscale); float hue.
"""

import dataclasses
import math

import dm_pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# Taps each side of one box pass: PIL's box radius at the largest sigma
# allowed (2.0) is 1.375, so its fractional end taps sit at +-2; three passes
# reach +-6 = 3 sigma.
BLUR_RADIUS = 2
BLUR_PASSES = 3  # box passes per axis in PIL's GaussianBlur
# numpy, not jnp: importing a module must not start a JAX backend
# (jax.distributed.initialize runs after the imports in main).
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class CropSpec:
  """One crop type (SPEC §5.1)."""

  size: int
  scale: tuple[float, float]
  blur_prob: float
  solarize_prob: float
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  gray_prob: float = 0.2
  sigma: tuple[float, float] = (0.1, 2.0)  # blur std in pixels
  # Round to uint8 where PIL does and the default float pipeline does not
  # (SPEC 5.4 accepts either): between and after the two resize passes,
  # after hue and grayscale.
  uint8_rounding: bool = False


def crop_specs(
  crops: ml_collections.ConfigDict,
) -> tuple[list[CropSpec], list[CropSpec]]:
  """(global specs, local specs) from the ``crops`` config group."""
  # Configs saved before blur_sigma existed use the official range.
  sigma = tuple(crops.get('blur_sigma', CropSpec.sigma))
  uint8_rounding = bool(crops.get('uint8_rounding', False))
  g = dict(
    size=crops.global_size,
    scale=tuple(crops.global_scale),
    sigma=sigma,
    uint8_rounding=uint8_rounding,
  )
  globals_ = [
    CropSpec(**g, blur_prob=1.0, solarize_prob=0.0),
    CropSpec(**g, blur_prob=0.1, solarize_prob=0.2),
  ]
  local = CropSpec(
    size=crops.local_size,
    scale=tuple(crops.local_scale),
    blur_prob=0.5,
    solarize_prob=0.0,
    sigma=sigma,
    uint8_rounding=uint8_rounding,
  )
  return globals_, [local] * crops.local_number


def sample_crop_box(
  key: jax.Array,
  height: jax.Array,
  width: jax.Array,
  scale: tuple[float, float],
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
  """torchvision ``RandomResizedCrop.get_params`` from the true image size.

  Args:
    key: PRNG key.
    height: true image height (int scalar).
    width: true image width.
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the aspect ratio w / h, sampled log-uniformly.

  Returns:
    int32 [4]: (top, left, crop_height, crop_width).
  """
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  h = height.astype(jnp.float32)
  w = width.astype(jnp.float32)
  area = h * w
  attempts = 10
  target = area * jax.random.uniform(
    k_area, (attempts,), minval=scale[0], maxval=scale[1]
  )
  log_ratio = jax.random.uniform(
    k_ratio, (attempts,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])
  )
  aspect = jnp.exp(log_ratio)
  cw = jnp.round(jnp.sqrt(target * aspect))  # half to even, as Python round
  ch = jnp.round(jnp.sqrt(target / aspect))
  valid = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  top = jnp.floor(jax.random.uniform(k_top, (attempts,)) * (h - ch + 1))
  left = jnp.floor(jax.random.uniform(k_left, (attempts,)) * (w - cw + 1))
  first = jnp.argmax(valid)
  # Fallback: central crop with the aspect clamped to the ratio range.
  in_ratio = w / h
  fb_w = jnp.where(
    in_ratio < ratio[0],
    w,
    jnp.where(in_ratio > ratio[1], jnp.round(h * ratio[1]), w),
  )
  fb_h = jnp.where(
    in_ratio < ratio[0],
    jnp.round(w / ratio[0]),
    h,
  )
  fb_top = jnp.floor((h - fb_h) / 2)
  fb_left = jnp.floor((w - fb_w) / 2)
  ok = jnp.any(valid)
  box = jnp.stack(
    [
      jnp.where(ok, top[first], fb_top),
      jnp.where(ok, left[first], fb_left),
      jnp.where(ok, ch[first], fb_h),
      jnp.where(ok, cw[first], fb_w),
    ]
  )
  return box.astype(jnp.int32)


def _pil_bicubic(x: jax.Array) -> jax.Array:
  """PIL's bicubic kernel (Keys, a = -0.5), support 2."""
  a = -0.5
  x = jnp.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return jnp.where(x < 1, near, jnp.where(x < 2, far, 0.0))


def _triangle(x: jax.Array) -> jax.Array:
  """PIL's bilinear kernel, support 1."""
  return jnp.maximum(1.0 - jnp.abs(x), 0.0)


KERNELS = {'bicubic': _pil_bicubic, 'bilinear': _triangle}


def resample_matrix(
  start: jax.Array,
  length: jax.Array,
  out_size: int,
  canvas: int,
  kernel: str = 'bicubic',
) -> jax.Array:
  """Weights [out_size, canvas] resizing [start, start + length) to out_size.

  PIL semantics: half-pixel centres, the kernel stretched by in/out when
  downscaling (antialiasing), weights outside the box zeroed and rows
  renormalized (PIL crops before it resizes).
  """
  start = start.astype(jnp.float32)
  length = length.astype(jnp.float32)
  step = length / out_size
  support = jnp.maximum(step, 1.0)
  centers = start + (jnp.arange(out_size) + 0.5) * step  # [out]
  pixels = jnp.arange(canvas) + 0.5  # [canvas] pixel centres
  weights = KERNELS[kernel]((pixels[None, :] - centers[:, None]) / support)
  inside = (pixels >= start) & (pixels < start + length)
  weights = jnp.where(inside[None, :], weights, 0.0)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def resized_crop(
  image: jax.Array,
  box: jax.Array,
  size: int,
  kernel: str = 'bicubic',
  two_pass: bool = False,
) -> jax.Array:
  """Crop ``box`` of ``image`` [C, C, 3] and resize to [size, size, 3].

  ``kernel``: 'bicubic' (DINO crops) or 'bilinear' (linear-probe crops).
  ``two_pass``: as PIL, a horizontal pass, clipped and rounded to uint8,
  then a vertical one, clipped and rounded (bicubic overshoot at sharp edges
  is clipped in between); else one float pass, clipped.
  """
  canvas = image.shape[0]
  wy = resample_matrix(box[0], box[2], size, canvas, kernel)
  wx = resample_matrix(box[1], box[3], size, canvas, kernel)
  hi = jax.lax.Precision.HIGHEST
  x = image.astype(jnp.float32)
  if not two_pass:
    out = jnp.einsum('oi,ijc,pj->opc', wy, x, wx, precision=hi)
    return jnp.clip(out, 0.0, 255.0)
  x = _round_half_up(jnp.einsum('ijc,pj->ipc', x, wx, precision=hi))
  return _round_half_up(jnp.einsum('oi,ipc->opc', wy, x, precision=hi))


def _round_half_up(x: jax.Array) -> jax.Array:
  """Clip to 0..255 and round half up, as PIL's uint8 resampling does."""
  return jnp.floor(jnp.clip(x, 0.0, 255.0) + 0.5)


def gray(x: jax.Array) -> jax.Array:
  """ITU-R 601-2 luma, [..., 3] -> [..., 1] (PIL ``convert('L')``)."""
  return jnp.sum(x * _LUMA, axis=-1, keepdims=True)


def luma(x: jax.Array) -> jax.Array:
  """The uint8 gray image PIL blends with: round(gray(x)), [..., 1]."""
  return jnp.round(gray(x))


def _blend(degenerate: jax.Array, x: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL ``Image.blend(degenerate, x, factor)``: clipped, truncated to uint8.

  Kept in float, the blends would come out about half a level brighter each
  than PIL's (+1.5 levels on average after all three).

  Args:
    degenerate: float, broadcastable to x (black, mean gray, or gray image).
    x: float [H, W, 3] on the 0..255 scale.
    factor: float32 [] blend factor.

  Returns:
    float32 [H, W, 3], integer values in 0..255.
  """
  return jnp.floor(jnp.clip(degenerate + factor * (x - degenerate), 0, 255))


def adjust_brightness(x: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL: blend with black, x * factor."""
  return _blend(jnp.zeros_like(x), x, factor)


def adjust_contrast(x: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL: blend with the rounded mean of the uint8 gray image."""
  return _blend(jnp.round(jnp.mean(luma(x))), x, factor)


def adjust_saturation(x: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL: blend with the per-pixel uint8 gray image."""
  return _blend(luma(x), x, factor)


def adjust_hue(x: jax.Array, delta: jax.Array) -> jax.Array:
  """Rotate hue by ``delta`` turns (SPEC §5.4: float HSV is acceptable)."""
  return jnp.clip(dm_pix.adjust_hue(x / 255.0, delta) * 255.0, 0.0, 255.0)


def _blend_op(x: jax.Array, op: jax.Array, factors: jax.Array) -> jax.Array:
  """Brightness (op 0), contrast (1) or saturation (2), chosen by a traced op.

  All three are one PIL blend, with black, the rounded mean gray level or
  the gray image: one blend with a selected degenerate image, rather than
  the three ops computed and one selected (under vmap a ``lax.switch`` over
  per-sample indices computes every branch).
  """
  l = luma(x)
  degenerate = jnp.where(
    op == 0, 0.0, jnp.where(op == 1, jnp.round(jnp.mean(l)), l)
  )
  return _blend(degenerate, x, factors[op])


def color_jitter(
  x: jax.Array,
  order: jax.Array,
  factors: jax.Array,
  uint8_rounding: bool = False,
):
  """torchvision ``ColorJitter`` with fixed choices: the four ops in ``order``.

  Hue, the one op that is not a blend, is computed once: the blends ordered
  before it, hue, the blends after it (each blend position applied or not).

  Args:
    x: float [H, W, 3] on the 0..255 scale.
    order: int32 [4], a permutation of 0 brightness, 1 contrast,
      2 saturation, 3 hue.
    factors: float32 [4] (b, c, s, h).
    uint8_rounding: round the hue output to uint8 (see ``CropSpec``).

  Returns:
    float32 [H, W, 3].
  """
  hue_at = jnp.argmax(order == 3)
  # The three blend ops in their order: order without the 3 (stable sort of
  # the positions by "is hue").
  blends = order[jnp.argsort(order == 3, stable=True)[:3]]
  for m in range(3):
    x = jnp.where(m < hue_at, _blend_op(x, blends[m], factors), x)
  x = adjust_hue(x, factors[3])
  if uint8_rounding:
    x = jnp.round(x)
  for m in range(3):
    x = jnp.where(m >= hue_at, _blend_op(x, blends[m], factors), x)
  return x


def pil_box_radius(sigma: jax.typing.ArrayLike) -> jax.Array:
  """PIL's fractional box radius for a 3-pass blur of standard deviation sigma.

  PIL (``_gaussian_blur_radius`` in libImaging/BoxBlur.c, after Gwosdek et
  al. 2011) picks an integer box radius l and end-tap weight a so that three
  passes of the box have variance sigma^2 exactly. float32 in PIL's order;
  under jit XLA may fold / 3 into * (1 / 3), which moves the result by an ulp
  (PIL's 2^24-scale weights by a few units, a rare one-level difference).

  Args:
    sigma: float32 [] blur std in pixels (PIL's ``radius``).

  Returns:
    float32 [] l + a, the fractional box radius.
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  var = sigma * sigma / BLUR_PASSES  # variance of one pass
  length = jnp.sqrt(12.0 * var + 1.0)  # ideal box length
  l = jnp.floor((length - 1.0) / 2.0)  # integer part
  a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * var)
  a = a / (6.0 * (var - (l + 1.0) * (l + 1.0)))
  return l + a


def box_taps(sigma: jax.typing.ArrayLike) -> jax.Array:
  """PIL's fixed-point weights of one extended box pass (sum <= 2^24).

  Integer radius r = int(l + a): the 2r + 1 inner taps weigh
  ww = int(2^24 / (2 (l + a) + 1)) and the two end taps at +-(r + 1) share
  the rest, fw = (2^24 - (2r + 1) ww) // 2.

  Args:
    sigma: float32 [] blur std in pixels, at most 2.0.

  Returns:
    uint32 [2 * BLUR_RADIUS + 1] weights for offsets -BLUR_RADIUS..BLUR_RADIUS.
  """
  radius = pil_box_radius(sigma)
  r = radius.astype(jnp.uint32)  # truncation, as C's (int)
  ww = (jnp.float32(1 << 24) / (radius * 2.0 + 1.0)).astype(jnp.uint32)
  fw = (jnp.uint32(1 << 24) - (2 * r + 1) * ww) // 2
  offset = jnp.abs(jnp.arange(-BLUR_RADIUS, BLUR_RADIUS + 1)).astype(r.dtype)
  zero = jnp.uint32(0)
  return jnp.where(offset <= r, ww, jnp.where(offset == r + 1, fw, zero))


def _box_pass(v: jax.Array, taps: jax.Array, axis: int) -> jax.Array:
  """One PIL box pass along ``axis`` of uint32 v, edges extended, rounded.

  Static shifted slices of the edge-padded array rather than gathers, so a
  vmapped batch with a different kernel per sample stays elementwise.
  """
  n = v.shape[axis]
  pad = [(0, 0)] * v.ndim
  pad[axis] = (BLUR_RADIUS, BLUR_RADIUS)
  # Materialized once: fused into each tap, XLA:CPU re-evaluates the edge
  # concatenation per element and per tap (5-10x slower).
  padded = jax.lax.optimization_barrier(jnp.pad(v, pad, mode='edge'))
  # Below 2^32: the weights sum to at most 2^24 and v <= 255.
  acc = sum(
    taps[k] * jax.lax.slice_in_dim(padded, k, k + n, axis=axis)
    for k in range(2 * BLUR_RADIUS + 1)
  )
  return (acc + (1 << 23)) >> 24  # PIL rounds half up to uint8


def gaussian_blur(x: jax.Array, sigma: jax.typing.ArrayLike) -> jax.Array:
  """PIL ``ImageFilter.GaussianBlur(radius=sigma)``: sigma is the std.

  Rounds x to the uint8 image PIL would hold, then 3 extended box passes
  along the width and 3 along the height (PIL's order), each with edge
  extension and rounding to uint8. On uint8 input this is PIL's output (but
  for a rare one-level tie, see ``pil_box_radius``).

  Args:
    x: float [H, W, C] on the 0..255 scale.
    sigma: float32 [] blur std in pixels, in (0, 2.0].

  Returns:
    float32 [H, W, C], integer values in 0..255.
  """
  v = jnp.round(jnp.clip(x, 0.0, 255.0)).astype(jnp.uint32)
  taps = box_taps(sigma)
  for axis in (1, 0):  # horizontal passes first, as PIL
    for _ in range(BLUR_PASSES):
      v = _box_pass(v, taps, axis)
  return v.astype(jnp.float32)


def solarize(x: jax.Array) -> jax.Array:
  """PIL ``ImageOps.solarize(threshold=128)``: v >= 128 -> 255 - v.

  The threshold applies to the uint8 values PIL would see, round(x), so
  127.6 (PIL's 128) is inverted; the output stays float (255 - x).
  """
  return jnp.where(jnp.round(x) >= 128.0, 255.0 - x, x)


def normalize(x: jax.Array) -> jax.Array:
  """0..255 -> ToTensor -> Normalize(ImageNet mean, std)."""
  return (x / 255.0 - jnp.array(MEAN)) / jnp.array(STD)


def sample_params(
  key: jax.Array, size_hw: jax.Array, spec: CropSpec
) -> dict[str, jax.Array]:
  """Every random choice of one crop (as torchvision's ``get_params``).

  Returns:
    box int32 [4]; flip, jitter, gray, blur, solarize bool []; order int32
    [4] (jitter op order: 0 brightness, 1 contrast, 2 saturation, 3 hue);
    factors float32 [4] (b ~ U[0.6, 1.4], c ~ U[0.6, 1.4], s ~ U[0.8, 1.2],
    h ~ U[-0.1, 0.1]); sigma float32 [] ~ U(spec.sigma), (0.1, 2.0) officially.
  """
  k = jax.random.split(key, 12)
  uniform = lambda i, lo, hi: jax.random.uniform(k[i], (), minval=lo, maxval=hi)
  return {
    'box': sample_crop_box(
      k[0], size_hw[0], size_hw[1], spec.scale, spec.ratio
    ),
    'flip': jax.random.uniform(k[1]) < spec.flip_prob,
    'jitter': jax.random.uniform(k[2]) < spec.jitter_prob,
    'order': jax.random.permutation(k[3], 4),
    'factors': jnp.stack(
      [
        uniform(4, 0.6, 1.4),
        uniform(5, 0.6, 1.4),
        uniform(6, 0.8, 1.2),
        uniform(7, -0.1, 0.1),
      ]
    ),
    'gray': jax.random.uniform(k[8]) < spec.gray_prob,
    # Blur when U <= p, so p = 1 always blurs (SPEC §5.3).
    'blur': jax.random.uniform(k[9]) <= spec.blur_prob,
    'sigma': uniform(10, *spec.sigma),
    'solarize': jax.random.uniform(k[11]) < spec.solarize_prob,
  }


def apply_params(
  image: jax.Array,
  params: dict[str, jax.Array],
  size: int,
  uint8_rounding: bool = False,
) -> jax.Array:
  """The DINO crop pipeline with fixed random choices.

  Args:
    image: uint8 [C, C, 3] canvas, the image top-left.
    params: from ``sample_params``.
    size: output size.
    uint8_rounding: see ``CropSpec``.

  Returns:
    float32 [size, size, 3], normalized.
  """
  x = resized_crop(image, params['box'], size, two_pass=uint8_rounding)
  x = jnp.where(params['flip'], x[:, ::-1], x)
  jittered = color_jitter(x, params['order'], params['factors'], uint8_rounding)
  x = jnp.where(params['jitter'], jittered, x)
  grayed = gray(x)
  if uint8_rounding:
    grayed = jnp.round(grayed)
  x = jnp.where(params['gray'], jnp.broadcast_to(grayed, x.shape), x)
  x = jnp.where(params['blur'], gaussian_blur(x, params['sigma']), x)
  x = jnp.where(params['solarize'], solarize(x), x)
  return normalize(x)


def augment_crop(
  key: jax.Array, image: jax.Array, size_hw: jax.Array, spec: CropSpec
) -> jax.Array:
  """One DINO crop of one image: [spec.size, spec.size, 3] normalized.

  Args:
    key: PRNG key for this (image, crop).
    image: uint8 [C, C, 3] canvas, the image top-left.
    size_hw: int32 [2] true (height, width).
    spec: the crop type.
  """
  return apply_params(
    image, sample_params(key, size_hw, spec), spec.size, spec.uint8_rounding
  )


def _crops(keys, images, sizes, specs):
  """Crop i of ``specs[i]`` for every image: [len(specs), B, S, S, 3].

  Args:
    keys: [len(specs), B] PRNG keys, one per (crop, image).
    images: uint8 [B, C, C, 3] canvases.
    sizes: int32 [B, 2] true sizes.
    specs: crop specs that differ at most in their blur and solarization
      rates; the rates enter as data, so all crops share one vmapped
      pipeline (one compiled copy, not one per spec).
  """
  base = dataclasses.replace(specs[0], blur_prob=0.0, solarize_prob=0.0)
  for spec in specs:
    if dataclasses.replace(spec, blur_prob=0.0, solarize_prob=0.0) != base:
      raise ValueError(f'crop specs {specs} differ in more than their rates')
  rates = jnp.array(
    [(s.blur_prob, s.solarize_prob) for s in specs], jnp.float32
  )

  def crops(ks, rate):
    spec = dataclasses.replace(base, blur_prob=rate[0], solarize_prob=rate[1])
    per_image = jax.vmap(lambda k, im, hw: augment_crop(k, im, hw, spec))
    return per_image(ks, images, sizes)

  return jax.vmap(crops)(keys, rates)


def make_multicrop(crops: ml_collections.ConfigDict):
  """``augment(key, batch) -> {'global_crops', 'local_crops'}`` for the step.

  Keys depend only on (key, crop index, index in the global batch), so the
  crops do not depend on how the batch is sharded.
  """
  global_specs, local_specs = crop_specs(crops)

  def augment(key: jax.Array, batch: dict[str, jax.Array]):
    images, sizes = batch['image'], batch['size']
    k_globals, k_locals = jax.random.split(key)
    b = images.shape[0]
    # One key per global crop type, split per image; the local crops split
    # theirs per (crop, image).
    g_keys = jnp.stack(
      [
        jax.random.split(k, (1, b))[0]
        for k in jax.random.split(k_globals, len(global_specs))
      ]
    )
    out = {'global_crops': _crops(g_keys, images, sizes, global_specs)}
    if local_specs:
      l_keys = jax.random.split(k_locals, (len(local_specs), b))
      out['local_crops'] = _crops(l_keys, images, sizes, local_specs)
    return out

  return augment
