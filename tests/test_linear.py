"""Linear probe: learns a separable problem; SPEC §7.2 details."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from PIL import Image

from dino_jax import config as config_lib
from dino_jax import models, parallel
from dino_jax.data import multicrop
from dino_jax.eval import linear


class ColorSource:
  """Class c: colour c plus noise, so raw features separate the classes."""

  classes = ('red', 'green', 'blue')

  def __len__(self):
    return 96

  def __getitem__(self, i):
    rs = np.random.RandomState(i)
    label = i % 3
    image = rs.randint(0, 80, (36, 36, 3))
    image[..., label] += 150
    return {'image': image.astype(np.uint8), 'label': label}


def tiny():
  model = models.VisionTransformer(
    patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32
  )
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  return model, params


class LinearProbeTest(parameterized.TestCase):
  @parameterized.parameters(False, True)
  def test_learns_separable_problem(self, augment):
    config = config_lib.default_config()
    config.data.source = 'synthetic'  # replaced below
    config.data.canvas_size = 40
    config.data.num_workers = 0
    config.eval.resize_size = 32
    config.eval.crop_size = 32
    config.eval.batch_size = 16
    config.linear.epochs = 15
    config.linear.batch_size = 16
    config.linear.lr = 0.5
    config.linear.n_last_blocks = 2
    config.linear.augment = augment
    model, params = tiny()
    original = linear.sources.make_source
    linear.sources.make_source = lambda data, split=None: ColorSource()
    try:
      result = linear.train_linear_probe(
        config, parallel.make_mesh(), model, params
      )
    finally:
      linear.sources.make_source = original
    self.assertEqual(result['feature_dim'], 64)  # 2 blocks x 32
    self.assertGreaterEqual(result['best_top1'], 95.0)
    first = result['history'][0]
    self.assertAlmostEqual(first['lr'], 0.5 * 16 / 256, places=9)
    self.assertLess(result['history'][-1]['loss'], 0.5)

  def test_avgpool_interleaves(self):
    model, params = tiny()
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    feats = linear.probe_features(model, params, images, 1, True)
    tokens = model.apply({'params': params}, images, method='features')
    np.testing.assert_allclose(feats[:, 0::2], tokens[:, 0], atol=1e-6)
    np.testing.assert_allclose(feats[:, 1::2], tokens[:, 1:].mean(1), atol=1e-6)
    with self.assertRaisesRegex(ValueError, 'avgpool'):
      linear.probe_features(model, params, images, 2, True)

  def test_epoch_schedule(self):
    np.testing.assert_allclose(
      linear.epoch_lrs(0.004, 4), [0.004, 0.0034142136, 0.002, 0.0005857864]
    )

  def test_bilinear_crop_matches_pil(self):
    rs = np.random.RandomState(0)
    arr = rs.randint(0, 256, (30, 40, 3)).astype(np.uint8)
    canvas = np.zeros((64, 64, 3), np.uint8)
    canvas[:30, :40] = arr
    for size in (16, 56):
      pil = np.asarray(
        Image.fromarray(arr).resize((size, size), Image.BILINEAR), float
      )
      ours = multicrop.resized_crop(
        jnp.asarray(canvas), jnp.array([0, 0, 30, 40]), size, kernel='bilinear'
      )
      self.assertLess(np.abs(np.asarray(ours) - pil).max(), 1.1)


if __name__ == '__main__':
  absltest.main()
