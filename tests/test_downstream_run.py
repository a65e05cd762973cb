"""The end-of-training evaluations beyond k-NN (eval.linear, mask Jaccard).

``eval.run.after_training`` with ``eval.linear`` and
``eval.mask_jaccard_images`` prints and records (WORKDIR/eval/
downstream.json) the lr-swept linear probe and the attention-mask Jaccard
of the trained teacher and its baselines; the numbers are those of the
evaluations called directly.
"""

import json
import os
import tempfile

import numpy as np
import tiny_config
from absl.testing import absltest
from test_attention_masks import write_idx

from dino_jax import parallel
from dino_jax import step as step_lib
from dino_jax.eval import attention, linear
from dino_jax.eval import run as run_lib


def fashion_files(path: str) -> np.ndarray:
  """Tiny Fashion-MNIST IDX files: boxes on black, 2 classes by height."""
  rs = np.random.RandomState(0)
  images = np.zeros((40, 28, 28), np.uint8)
  labels = np.arange(40) % 2
  for image, label in zip(images, labels, strict=True):
    top, left = rs.randint(0, 8, 2)
    height = 8 if label else 18
    image[top : top + height, left : left + 12] = rs.randint(60, 256)
  for prefix in ('train', 't10k'):
    write_idx(os.path.join(path, f'{prefix}-images-idx3-ubyte'), images)
    write_idx(os.path.join(path, f'{prefix}-labels-idx1-ubyte'), labels)
  return images


class DownstreamAfterTrainingTest(absltest.TestCase):
  def test_linear_sweep_and_mask_jaccard_recorded(self):
    root = tempfile.mkdtemp()
    images = fashion_files(root)
    config = tiny_config.get_config()
    config.data.source = 'fashion_mnist'
    config.data.path = root
    config.eval.knn = False
    config.eval.attention_images = 0
    config.eval.test_split = 'test'
    config.eval.resize_size = config.eval.crop_size = 24
    config.eval.batch_size = 8
    config.eval.baselines = True
    config.eval.linear = True
    config.eval.mask_jaccard_images = 4
    config.linear.epochs = 2
    config.linear.augment = False
    config.linear.batch_size = 8
    config.linear.sweep_lrs = (1e-3, 1e-1)
    mesh = parallel.make_mesh()
    _, _, init_fn = step_lib.state_template(config)
    state = init_fn()
    out = run_lib.after_training(config, root, mesh, state, step=7)

    _, teacher = step_lib.build_models(config)
    backbone, params = teacher.backbone, state.teacher['backbone']
    init = run_lib._random_init(config, mesh, backbone)
    want_linear = {
      name: linear.linear_sweep_eval(config, mesh, m, p)['top1']
      for name, (m, p) in (
        ('trained', (backbone, params)),
        ('random_init', (backbone, init)),
        ('raw_pixels', (None, None)),
      )
    }
    imgs, sil = run_lib.silhouette_images(config, 4)
    np.testing.assert_array_equal(sil, images[:4] > 0)
    want_jaccard = {
      name: 100
      * attention.mask_jaccard_eval(config, mesh, backbone, p, imgs, sil)
      for name, p in (('trained', params), ('random_init', init))
    }
    record = json.load(open(os.path.join(root, 'eval', 'downstream.json')))
    self.assertEqual(record['step'], 7)
    for name, top1 in want_linear.items():
      self.assertAlmostEqual(record['linear'][name]['top1'], top1, places=6)
      self.assertAlmostEqual(out['linear'][name]['top1'], top1, places=6)
      self.assertIn(record['linear'][name]['lr'], (1e-3, 1e-1))
    self.assertEqual(set(record['mask_jaccard']), set(want_jaccard))
    for name, score in want_jaccard.items():
      self.assertAlmostEqual(record['mask_jaccard'][name], score, places=6)
      self.assertTrue(0 < score <= 100)

  def test_off_by_default(self):
    config = tiny_config.get_config()
    self.assertFalse(config.eval.linear)
    self.assertEqual(config.eval.mask_jaccard_images, 0)


if __name__ == '__main__':
  absltest.main()
