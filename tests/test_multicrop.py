"""On-device DINO multi-crop against closed forms, PIL, and its rates."""

import itertools
import math
import random

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import reference
from absl.testing import absltest, parameterized
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dino_jax import config as config_lib
from dino_jax.data import multicrop


def smooth_image(seed, h, w):
  rs = np.random.RandomState(seed)
  arr = rs.randint(0, 256, (h, w, 3)).astype(np.uint8)
  return np.asarray(Image.fromarray(arr).filter(ImageFilter.GaussianBlur(1)))


def on_canvas(arr, canvas=128):
  out = np.zeros((canvas, canvas, 3), np.uint8)
  out[: arr.shape[0], : arr.shape[1]] = arr
  return jnp.asarray(out)


SPEC = multicrop.CropSpec(
  size=32, scale=(0.05, 0.4), blur_prob=0.5, solarize_prob=0.2
)


class CropBoxTest(parameterized.TestCase):
  @parameterized.parameters(((0.4, 1.0), 300, 400), ((0.05, 0.4), 480, 360))
  def test_area_and_aspect_distribution(self, scale, h, w):
    keys = jax.random.split(jax.random.key(0), 4000)
    boxes = np.asarray(
      jax.vmap(
        lambda k: multicrop.sample_crop_box(
          k, jnp.int32(h), jnp.int32(w), scale
        )
      )(keys)
    )
    top, left, ch, cw = boxes.T
    self.assertTrue(np.all(top >= 0) and np.all(left >= 0))
    self.assertTrue(np.all(top + ch <= h) and np.all(left + cw <= w))
    area = ch * cw / (h * w)
    # rounding of w and h moves the area by at most ~1 pixel per side
    slack = (ch + cw + 1) / (h * w)
    self.assertTrue(np.all(area >= scale[0] - slack))
    self.assertTrue(np.all(area <= scale[1] + slack))
    log_ratio = np.log(cw / ch)
    self.assertLess(log_ratio.max(), math.log(4 / 3) + 0.02)
    self.assertGreater(log_ratio.min(), math.log(3 / 4) - 0.02)
    # Same distributions as torchvision's algorithm (KS, n = 4000 each;
    # 0.045 is the 0.1% critical value). A uniform (not log-uniform) aspect
    # or a scale relative to the canvas fails this.
    rng = random.Random(0)
    ref = np.array(
      [reference.random_resized_crop_box(rng, h, w, scale) for _ in range(4000)]
    )
    self.assertLess(
      reference.ks_statistic(area, ref[:, 2] * ref[:, 3] / (h * w)), 0.045
    )
    self.assertLess(
      reference.ks_statistic(log_ratio, np.log(ref[:, 3] / ref[:, 2])),
      0.045,
    )
    self.assertLess(reference.ks_statistic(top / h, ref[:, 0] / h), 0.045)
    # Top-left offsets cover the whole valid range.
    self.assertEqual(int(top.min()), 0)

  def test_fallback_central_crop(self):
    # 2 x 60: no sampled box fits at scale >= 0.5, aspect 30 > 4/3.
    box = multicrop.sample_crop_box(
      jax.random.key(1), jnp.int32(2), jnp.int32(60), (0.5, 1.0)
    )
    # h = 2, w = round(2 * 4/3) = 3, top = 0, left = (60 - 3) // 2 = 28
    np.testing.assert_array_equal(box, [0, 28, 2, 3])
    box = multicrop.sample_crop_box(
      jax.random.key(1), jnp.int32(60), jnp.int32(2), (0.5, 1.0)
    )
    np.testing.assert_array_equal(box, [28, 0, 3, 2])

  def test_small_image_upscales(self):
    params = multicrop.sample_crop_box(
      jax.random.key(2), jnp.int32(8), jnp.int32(8), (0.4, 1.0)
    )
    self.assertTrue(np.all(np.asarray(params)[2:] <= 8))


class ResampleTest(parameterized.TestCase):
  def test_full_crop_at_same_size_is_identity(self):
    arr = smooth_image(0, 40, 40)
    out = multicrop.resized_crop(on_canvas(arr), jnp.array([0, 0, 40, 40]), 40)
    np.testing.assert_allclose(out, arr, atol=1e-3)

  @parameterized.parameters(
    (60, 80, 32, (0, 0, 60, 80)),
    (20, 30, 64, (0, 0, 20, 30)),
    (100, 90, 40, (10, 5, 50, 70)),
    (50, 50, 96, (3, 7, 20, 25)),
  )
  def test_matches_pil_bicubic(self, h, w, size, box):
    arr = smooth_image(1, h, w)
    top, left, ch, cw = box
    pil = Image.fromarray(arr).crop((left, top, left + cw, top + ch))
    pil = np.asarray(pil.resize((size, size), Image.BICUBIC), np.float64)
    ours = multicrop.resized_crop(on_canvas(arr), jnp.array(box), size)
    # PIL rounds to uint8: at most one level apart.
    self.assertLess(np.abs(np.asarray(ours) - pil).max(), 1.1)

  def test_two_pass_matches_pil_on_sharp_images(self):
    # Black/white pixels (edges everywhere, as in Fashion-MNIST): PIL clips
    # and rounds the bicubic overshoot after its horizontal pass; one float
    # pass does not, and lands several levels away.
    arr = (np.random.RandomState(3).rand(28, 28, 3) > 0.5).astype(np.uint8)
    arr *= 255
    for box, size in [((2, 3, 14, 17), 28), ((0, 0, 28, 28), 12)]:
      top, left, ch, cw = box
      pil = Image.fromarray(arr).crop((left, top, left + cw, top + ch))
      pil = np.asarray(pil.resize((size, size), Image.BICUBIC), np.float64)
      two = np.asarray(
        multicrop.resized_crop(
          on_canvas(arr), jnp.array(box), size, 'bicubic', True
        )
      )
      one = np.asarray(
        multicrop.resized_crop(on_canvas(arr), jnp.array(box), size)
      )
      np.testing.assert_array_equal(two, np.round(two))  # uint8 values
      # PIL's fixed-point weights: a rare tie rounds the other way.
      self.assertLessEqual(np.abs(two - pil).max(), 1.0, box)
      self.assertLess(np.mean(two != pil), 0.01, box)
      self.assertGreater(np.abs(one - pil).max(), 5.0, box)

  def test_canvas_padding_never_bleeds(self):
    arr = np.full((30, 20, 3), 200, np.uint8)  # canvas outside is 0
    out = multicrop.resized_crop(on_canvas(arr), jnp.array([0, 0, 30, 20]), 64)
    np.testing.assert_allclose(out, 200.0, atol=1e-3)


class PhotometricTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.arr = smooth_image(2, 24, 24)
    self.x = jnp.asarray(self.arr, jnp.float32)

  @parameterized.parameters(
    ('brightness', multicrop.adjust_brightness, ImageEnhance.Brightness),
    ('contrast', multicrop.adjust_contrast, ImageEnhance.Contrast),
    ('saturation', multicrop.adjust_saturation, ImageEnhance.Color),
  )
  def test_matches_pil_enhance(self, _, ours, pil_enhance):
    for factor in (0.6, 1.3):
      pil = pil_enhance(Image.fromarray(self.arr)).enhance(factor)
      got = ours(self.x, jnp.float32(factor))
      self.assertLess(np.abs(np.asarray(got) - np.asarray(pil)).max(), 1.6)

  @parameterized.parameters(itertools.permutations(range(3)))
  def test_jitter_sequence_matches_pil(self, *order):
    # PIL truncates each blend to uint8; float blends drift up ~0.5 each.
    factors = (1.3, 0.7, 1.15)  # brightness, contrast, saturation
    ops = (
      (multicrop.adjust_brightness, ImageEnhance.Brightness),
      (multicrop.adjust_contrast, ImageEnhance.Contrast),
      (multicrop.adjust_saturation, ImageEnhance.Color),
    )
    x, pil = self.x, Image.fromarray(self.arr)
    for i in order:
      x = ops[i][0](x, jnp.float32(factors[i]))
      pil = ops[i][1](pil).enhance(factors[i])
    diff = np.asarray(x) - np.asarray(pil, np.float64)
    self.assertLess(abs(diff.mean()), 0.05)  # float blends: about +1.5
    self.assertLess(np.mean(diff != 0), 0.01)

  def test_color_jitter_applies_the_ops_in_order(self):
    # color_jitter computes hue once and the blends in their slots; it must
    # equal the four ops applied one after another, for every order, also
    # vmapped over per-sample orders (as in the pipeline).
    factors = jnp.array([1.3, 0.7, 1.15, 0.08], jnp.float32)
    ops = (
      multicrop.adjust_brightness,
      multicrop.adjust_contrast,
      multicrop.adjust_saturation,
      multicrop.adjust_hue,
    )
    orders = jnp.array(list(itertools.permutations(range(4))), jnp.int32)
    got = jax.jit(
      jax.vmap(lambda o: multicrop.color_jitter(self.x, o, factors))
    )(orders)
    for order, out in zip(np.asarray(orders), np.asarray(got), strict=True):
      ref = self.x
      for i in order:
        ref = ops[i](ref, factors[i])
      diff = np.abs(out - np.asarray(ref))
      # Float rounding of the fused ops moves a rare value across a floor
      # (0.06 % of values at most, by up to 2 levels once the later blends
      # scale it); an op in the wrong slot changes 65-80 % of them.
      self.assertLessEqual(diff.max(), 2.0, order)
      self.assertLess(np.mean(diff > 1e-3), 0.005, order)

  def test_gray_weights(self):
    x = jnp.array([[[255.0, 0.0, 0.0], [0.0, 255.0, 0.0], [0.0, 0.0, 255.0]]])
    np.testing.assert_allclose(
      multicrop.gray(x)[0, :, 0], [76.245, 149.685, 29.07], rtol=1e-6
    )

  def test_solarize_threshold(self):
    x = jnp.array([0.0, 127.0, 127.4, 127.9, 128.0, 200.0, 255.0])
    # 127.9 is 128 to PIL: inverted (float kept: 255 - 127.9).
    np.testing.assert_allclose(
      multicrop.solarize(x), [0, 127, 127.4, 127.1, 127, 55, 0], rtol=1e-6
    )

  def test_solarize_matches_pil(self):
    x = np.array([0.0, 126.6, 127.2, 127.6, 127.9, 128.4, 131.7, 254.6])
    x = np.stack([x, x[::-1], np.roll(x, 3)], -1)[None]  # [1, 8, 3]
    # PIL sees the uint8 image the float pipeline stands for.
    seen = Image.fromarray(np.round(x).astype(np.uint8))
    pil = np.asarray(ImageOps.solarize(seen, 128), np.float64)
    ours = np.asarray(multicrop.solarize(jnp.asarray(x, jnp.float32)))
    np.testing.assert_array_equal(np.round(ours), pil)

  def test_normalize(self):
    x = jnp.full((1, 1, 3), 255.0)
    expected = (1 - np.array(multicrop.MEAN)) / np.array(multicrop.STD)
    np.testing.assert_allclose(
      multicrop.normalize(x)[0, 0], expected, rtol=1e-6
    )

  def test_hue_rotation(self):
    red = jnp.array([[[200.0, 0.0, 0.0]]])
    # One third of a turn takes pure red to pure green.
    np.testing.assert_allclose(
      multicrop.adjust_hue(red, 1 / 3)[0, 0], [0, 200, 0], atol=1e-3
    )

  def test_blur(self):
    const = jnp.full((32, 32, 3), 77.0)
    np.testing.assert_allclose(
      multicrop.gaussian_blur(const, 1.7), 77.0, rtol=1e-6
    )  # edges replicated, not zero-padded
    arr = smooth_image(3, 48, 48)
    for sigma in (0.5, 1.0, 2.0):
      pil = np.asarray(
        Image.fromarray(arr).filter(ImageFilter.GaussianBlur(sigma)), np.float64
      )
      ours = multicrop.gaussian_blur(jnp.asarray(arr, jnp.float32), sigma)
      self.assertLess(np.abs(np.asarray(ours) - pil).mean(), 1.0)


def pil_blur(arr, sigma):
  """PIL GaussianBlur of a uint8 array, sigma passed as float32 like ours."""
  image = Image.fromarray(arr).filter(
    ImageFilter.GaussianBlur(float(np.float32(sigma)))
  )
  return np.asarray(image, np.float64)


def point_variance(arr):
  """Variance along the width of the brightness in channel 0 of [H, W, 3]."""
  mass = arr[..., 0].astype(np.float64).sum(0)
  x = np.arange(mass.size)
  mean = (mass * x).sum() / mass.sum()
  return (mass * (x - mean) ** 2).sum() / mass.sum()


class BlurTest(parameterized.TestCase):
  """PIL's extended box blur (SPEC §5.3-5.4), small sigma included."""

  @parameterized.parameters(0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
  def test_kernel_variance_is_sigma_squared(self, sigma):
    taps = np.asarray(multicrop.box_taps(sigma), np.float64)
    self.assertLessEqual(taps.sum(), 2**24)
    self.assertGreater(taps.sum(), 2**24 - 2)  # PIL's fw = (rest) // 2
    box = taps / taps.sum()
    three = np.convolve(np.convolve(box, box), box)  # the 3 passes, one axis
    offsets = np.arange(three.size) - three.size // 2
    # Exact Gaussian taps give 0.000 at sigma 0.2 and 0.008 at 0.3.
    self.assertAlmostEqual((three * offsets**2).sum(), sigma**2, delta=1e-5)

  @parameterized.parameters(0.1, 0.2, 0.3, 1.0, 2.0)
  def test_point_matches_pil(self, sigma):
    arr = np.zeros((15, 15, 3), np.uint8)
    arr[7, 7] = 255
    pil = pil_blur(arr, sigma)
    ours = np.asarray(
      multicrop.gaussian_blur(jnp.asarray(arr, jnp.float32), sigma)
    )
    # PIL (uint8 per pass): 0.000, 0.046, 0.087, 0.943, 4.137 for these sigma;
    # peak 249 at sigma 0.1.
    self.assertAlmostEqual(point_variance(ours), point_variance(pil), places=6)
    np.testing.assert_array_equal(ours, pil)

  def test_random_images_match_pil(self):
    rs = np.random.RandomState(6)
    sigmas = np.concatenate(
      [[0.1, 0.2, 0.3, 1.0, 2.0], rs.uniform(0.1, 2.0, 11)]
    ).astype(np.float32)
    images = rs.randint(0, 256, (sigmas.size, 20, 20, 3)).astype(np.uint8)
    blur = jax.jit(
      jax.vmap(chex.assert_max_traces(multicrop.gaussian_blur, n=1))
    )
    # Off-grid floats stand for the uint8 image PIL would hold.
    offgrid = images + rs.uniform(-0.45, 0.45, images.shape)
    pil = np.stack(
      [pil_blur(a, s) for a, s in zip(images, sigmas, strict=True)]
    )
    for inputs in (images, offgrid):  # new values, same trace
      ours = np.asarray(blur(jnp.asarray(inputs, jnp.float32), sigmas))
      self.assertLessEqual(np.abs(ours - pil).max(), 1.0)
      self.assertLess(np.mean(ours != pil), 1e-3)  # 1-level ties are rare
    # Rectangular: PIL blurs along the width first, then the height.
    arr = rs.randint(0, 256, (9, 14, 3)).astype(np.uint8)
    ours = multicrop.gaussian_blur(jnp.asarray(arr, jnp.float32), 1.3)
    self.assertLessEqual(np.abs(np.asarray(ours) - pil_blur(arr, 1.3)).max(), 1)


class PipelineTest(parameterized.TestCase):
  def test_flip_exact(self):
    arr = smooth_image(4, 16, 16)
    params = multicrop.sample_params(
      jax.random.key(0), jnp.array([16, 16]), SPEC
    )
    params = dict(
      params,
      box=jnp.array([0, 0, 16, 16]),
      jitter=False,
      gray=False,
      blur=False,
      solarize=False,
    )
    plain = multicrop.apply_params(on_canvas(arr), dict(params, flip=False), 16)
    flipped = multicrop.apply_params(
      on_canvas(arr), dict(params, flip=True), 16
    )
    np.testing.assert_allclose(flipped, plain[:, ::-1], atol=1e-6)
    np.testing.assert_allclose(
      plain, multicrop.normalize(jnp.asarray(arr, jnp.float32)), atol=1e-4
    )

  def test_op_rates(self):
    keys = jax.random.split(jax.random.key(0), 20000)
    for spec in (
      SPEC,
      multicrop.CropSpec(32, (0.4, 1.0), blur_prob=1.0, solarize_prob=0.0),
      multicrop.CropSpec(32, (0.4, 1.0), blur_prob=0.1, solarize_prob=0.2),
    ):
      p = jax.vmap(
        lambda k, spec=spec: multicrop.sample_params(
          k, jnp.array([100, 100]), spec
        )
      )(keys)
      for name, rate in (
        ('flip', 0.5),
        ('jitter', 0.8),
        ('gray', 0.2),
        ('blur', spec.blur_prob),
        ('solarize', spec.solarize_prob),
      ):
        self.assertAlmostEqual(
          float(np.mean(p[name])), rate, delta=0.012, msg=name
        )
      factors = np.asarray(p['factors'])
      np.testing.assert_allclose(
        factors.min(0), [0.6, 0.6, 0.8, -0.1], atol=2e-3
      )
      np.testing.assert_allclose(
        factors.max(0), [1.4, 1.4, 1.2, 0.1], atol=2e-3
      )
      orders = {tuple(o) for o in np.asarray(p['order'][:2000])}
      self.assertLen(orders, 24)  # every permutation of the 4 ops occurs
      sigma = np.asarray(p['sigma'])
      np.testing.assert_allclose(
        [sigma.min(), sigma.max()], [0.1, 2.0], atol=2e-3
      )

  def test_blur_sigma_range_from_config(self):
    crops = config_lib.default_config().crops
    crops.blur_sigma = (0.1, 0.3)
    global_specs, local_specs = multicrop.crop_specs(crops)
    for spec in global_specs + local_specs:
      self.assertEqual(spec.sigma, (0.1, 0.3))
    keys = jax.random.split(jax.random.key(1), 5000)
    p = jax.vmap(
      lambda k: multicrop.sample_params(k, jnp.array([28, 28]), local_specs[0])
    )(keys)
    sigma = np.asarray(p['sigma'])
    np.testing.assert_allclose(
      [sigma.min(), sigma.max()], [0.1, 0.3], atol=1e-3
    )
    config = config_lib.default_config()
    config.crops.blur_sigma = (0.1, 3.0)
    with self.assertRaisesRegex(
      config_lib.ConfigError, r'crops.blur_sigma=\(0.1, 3.0\)'
    ):
      config_lib.validate(config, 1)

  def make_batch(self, n=4, canvas=64):
    rs = np.random.RandomState(5)
    images = rs.randint(0, 256, (n, canvas, canvas, 3)).astype(np.uint8)
    sizes = np.array([[64, 64], [40, 60], [10, 10], [64, 30]][:n], np.int32)
    return {'image': jnp.asarray(images), 'size': jnp.asarray(sizes)}

  def test_uint8_rounding_from_config(self):
    # With crops.uint8_rounding every crop holds uint8 values before the
    # normalization (PIL's crops are uint8 until ToTensor); without, the
    # float resize leaves fractions where no blend or blur rounded them
    # (6 % of the values here).
    def levels(uint8_rounding):
      crops = config_lib.default_config().crops
      crops.update(global_size=16, local_size=8, local_number=1)
      crops.uint8_rounding = uint8_rounding
      out = multicrop.make_multicrop(crops)(
        jax.random.key(0), self.make_batch()
      )
      x = np.concatenate([np.ravel(v) for v in out.values()])
      std = np.tile(multicrop.STD, x.size // 3)
      mean = np.tile(multicrop.MEAN, x.size // 3)
      return (x * std + mean) * 255

    x = levels(True)
    np.testing.assert_allclose(x, np.round(x), atol=2e-3)
    x = levels(False)
    self.assertGreater(np.mean(np.abs(x - np.round(x)) > 0.01), 0.02)

  def test_layout_determinism_and_no_retrace(self):
    crops = ml_collections.ConfigDict(
      dict(
        global_size=32,
        global_scale=(0.4, 1.0),
        local_number=3,
        local_size=16,
        local_scale=(0.05, 0.4),
      )
    )
    augment = jax.jit(
      chex.assert_max_traces(multicrop.make_multicrop(crops), n=1)
    )
    batch = self.make_batch()
    a = augment(jax.random.key(0), batch)
    chex.assert_shape(a['global_crops'], (2, 4, 32, 32, 3))
    chex.assert_shape(a['local_crops'], (3, 4, 16, 16, 3))
    chex.assert_type(a['global_crops'], jnp.float32)
    b = augment(jax.random.key(0), batch)
    chex.assert_trees_all_equal(a, b)
    c = augment(jax.random.key(1), self.make_batch())
    self.assertFalse(np.allclose(a['global_crops'], c['global_crops']))
    # Crops of one image differ from each other (independent keys).
    self.assertFalse(
      np.allclose(a['local_crops'][0, 0], a['local_crops'][1, 0])
    )
    # Within the normalized 0..255 range.
    lo = (0 - np.array(multicrop.MEAN)) / np.array(multicrop.STD)
    hi = (1 - np.array(multicrop.MEAN)) / np.array(multicrop.STD)
    for crops_ in a.values():
      self.assertTrue(np.all(np.asarray(crops_) >= lo - 1e-5))
      self.assertTrue(np.all(np.asarray(crops_) <= hi + 1e-5))


if __name__ == '__main__':
  absltest.main()
