"""Evaluation: weighted k-NN, attention maps, sharded feature extraction."""

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import tiny_config
from absl.testing import absltest, parameterized

from dino_jax import models, parallel
from dino_jax.data import sources
from dino_jax.evaluation import attention, features, knn


def knn_reference(train_x, train_y, test_x, test_y, k, t, num_classes):
  """SPEC §7.1 with plain numpy loops, query by query."""
  train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  test_x = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
  top1 = top5 = 0
  for q, label in zip(test_x, test_y, strict=True):
    sim = train_x @ q
    idx = np.argsort(-sim, kind='stable')[:k]
    scores = np.zeros(num_classes)
    for i in idx:
      scores[train_y[i]] += np.exp(sim[i] / t)
    order = np.argsort(-scores, kind='stable')
    top1 += order[0] == label
    top5 += label in order[: min(5, k)]
  return 100 * top1 / len(test_y), 100 * top5 / len(test_y)


def cls_fn(model, mesh, params):
  """images -> CLS features of ``model`` at ``params``."""
  return functools.partial(features.jit_feature_fn(model, mesh), params)


class KnnTest(parameterized.TestCase):
  def test_separated_features_score_100(self):
    rs = np.random.RandomState(0)
    centers = rs.randn(5, 16) * 10
    train_y = np.repeat(np.arange(5), 20)
    test_y = np.repeat(np.arange(5), 4)
    train_x = centers[train_y] + rs.randn(100, 16) * 0.1
    test_x = centers[test_y] + rs.randn(20, 16) * 0.1
    results = knn.knn_classify(train_x, train_y, test_x, test_y, ks=(10, 20))
    for k in (10, 20):
      self.assertEqual(results[k]['top1'], 100.0)
      self.assertEqual(results[k]['top5'], 100.0)

  @parameterized.parameters((3, 0.07), (10, 0.07), (20, 0.5))
  def test_matches_reference_voting(self, k, t):
    rs = np.random.RandomState(k)
    train_x, test_x = rs.randn(200, 8), rs.randn(60, 8)
    train_y, test_y = rs.randint(0, 7, 200), rs.randint(0, 7, 60)
    got = knn.knn_classify(
      train_x,
      train_y,
      test_x,
      test_y,
      ks=(k,),
      temperature=t,
      num_classes=7,
      chunk_size=17,
    )
    top1, top5 = knn_reference(train_x, train_y, test_x, test_y, k, t, 7)
    self.assertAlmostEqual(got[k]['top1'], top1, places=6)
    self.assertAlmostEqual(got[k]['top5'], top5, places=6)
    self.assertGreater(top5, top1)  # non-trivial case

  def test_table(self):
    table = knn.format_table({10: {'top1': 85.6, 'top5': 99.0}})
    self.assertIn('    10   85.60   99.00', table)


class LabelCheckTest(absltest.TestCase):
  def test_unlabelled_folder_and_same_split(self):
    from PIL import Image

    root = self.create_tempdir().full_path
    for i in range(2):
      Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(
        os.path.join(root, f'{i}.png')
      )
    config = tiny_config.get_config()
    config.data.source = 'imagefolder'
    config.data.path = root
    with self.assertRaisesRegex(sources.DataError, 'k-NN needs labels'):
      knn._check_labels(config)
    labelled = self.create_tempdir().full_path
    for name in ('a', 'b'):
      os.makedirs(os.path.join(labelled, name))
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
        os.path.join(labelled, name, '0.png')
      )
    config.data.path = labelled
    config.eval.test_split = 'validation'
    with self.assertLogs(knn.logger, 'WARNING') as logs:
      knn._check_labels(config)
    self.assertIn('not a held-out score', logs.output[0])


class AttentionTest(absltest.TestCase):
  def test_mask_keeps_threshold_mass(self):
    rs = np.random.RandomState(1)
    attn = rs.dirichlet(np.ones(49), size=3).reshape(3, 7, 7)
    mask = attention.attention_mask(attn, 0.6)
    for head in range(3):
      kept = np.sort(attn[head][mask[head]])
      self.assertGreaterEqual(kept.sum(), 0.6 - 1e-9)
      # Minimal: without its smallest patch the kept mass is below 0.6.
      self.assertLess(kept.sum() - kept[0], 0.6)
      # The kept patches are the largest ones.
      self.assertGreaterEqual(kept.min(), attn[head][~mask[head]].max())

  def test_maps_shapes_and_files(self):
    model = models.VisionTransformer(
      patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
    image = np.random.RandomState(2).randn(44, 36, 3).astype(np.float32)
    attn = attention.cls_attention(model, params, image, 8)
    self.assertEqual(attn.shape, (2, 5, 4))
    self.assertTrue(np.all(attn.sum(axis=(1, 2)) <= 1.0 + 1e-5))
    out = self.create_tempdir().full_path
    paths = attention.attention_for_image(
      model, params, image, 8, 0.6, out, 'x'
    )
    self.assertLen(paths, 2 * 2 + 1)
    self.assertTrue(all(os.path.exists(p) for p in paths))


class FeaturesTest(absltest.TestCase):
  def test_sharded_extraction_matches_single_device(self):
    model = models.VisionTransformer(
      patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
    source = sources.SyntheticSource(size=21, image_size=40)
    kw = dict(batch_size=8, resize_size=32, crop_size=32)
    meshes = [
      parallel.make_mesh(),
      parallel.make_mesh(devices=jax.devices()[:1]),
    ]
    x8, y8 = features.extract(
      cls_fn(model, meshes[0], params), source, mesh=meshes[0], **kw
    )
    x1, y1 = features.extract(
      cls_fn(model, meshes[1], params), source, mesh=meshes[1], **kw
    )
    self.assertEqual(x8.shape, (21, 32))
    np.testing.assert_array_equal(y8, [i % 10 for i in range(21)])
    np.testing.assert_array_equal(y1, y8)
    np.testing.assert_allclose(x8, x1, atol=1e-5)
    # Same as applying the model to the eval-transformed images directly.
    transform = features.EvalTransform(32, 32)
    direct = model.apply(
      {'params': params},
      jnp.stack([transform.map(source[i])['image'] for i in range(3)]),
    )
    np.testing.assert_allclose(x8[:3], direct, atol=1e-5)

  def test_every_image_once_in_source_order_for_any_workers(self):
    """Same rows, same order, for 0, 2 and 3 workers and any batch size."""
    model = models.VisionTransformer(
      patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
    source = sources.SyntheticSource(size=21, image_size=40)
    mesh = parallel.make_mesh()
    fn = cls_fn(model, mesh, params)
    kw = dict(mesh=mesh, resize_size=32, crop_size=32, log_every=0)
    x0, y0 = features.extract(fn, source, batch_size=8, num_workers=0, **kw)
    x2, y2 = features.extract(fn, source, batch_size=8, num_workers=2, **kw)
    x3, y3 = features.extract(fn, source, batch_size=16, num_workers=3, **kw)
    self.assertEqual(x0.shape, (21, 32))  # 21 = 8 + 8 + 5: every image once
    labels = [source[i]['label'] for i in range(21)]
    for y in (y0, y2, y3):
      np.testing.assert_array_equal(y, labels)
    np.testing.assert_array_equal(x2, x0)
    np.testing.assert_allclose(x3, x0, atol=1e-5)  # another batch shape
    transform = features.EvalTransform(32, 32)
    images = jnp.stack([transform.map(source[i])['image'] for i in range(21)])
    direct = model.apply({'params': params}, images)  # source order
    np.testing.assert_allclose(x0, direct, atol=1e-5)

  def test_undecodable_images_dropped_and_named_once(self):
    directory = self.create_tempdir()
    bad = directory.create_file('broken.jpg', content='not a jpeg').full_path
    good = np.full((40, 40, 3), 200, np.uint8)
    records = [
      {'image': good, 'label': 0},
      {'path': bad, 'label': 1},
      {'image': good, 'label': 2},
      {'bytes': b'garbage', 'label': 3},
      {'image': good, 'label': 4},
    ]
    pixels = lambda images: images.reshape(images.shape[0], -1)  # noqa: E731
    with self.assertLogs(features.logger, 'WARNING') as logs:
      x, y = features.extract(
        pixels,
        records,
        mesh=parallel.make_mesh(),
        batch_size=8,
        resize_size=32,
        crop_size=32,
        log_every=0,
      )
    np.testing.assert_array_equal(y, [0, 2, 4])
    self.assertEqual(x.shape, (3, 32 * 32 * 3))
    self.assertLen(logs.output, 1)
    self.assertRegex(
      logs.output[0],
      rf'skipped 2 undecodable images: {bad} \(\w+Error: .*\), '
      r'<in-memory image> \(',
    )

  def test_one_pass_for_several_feature_maps(self):
    """knn_eval_many decodes once and scores each map as if alone."""
    config = tiny_config.get_config()
    config.eval.max_test_images = 24
    model = models.VisionTransformer(
      patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
    mesh = parallel.make_mesh()
    pixels = lambda images: images.reshape(images.shape[0], -1)  # noqa: E731
    both = knn.knn_eval_many(
      config,
      mesh,
      {'vit': cls_fn(model, mesh, params), 'pixels': pixels},
    )
    self.assertEqual(set(both), {'vit', 'pixels'})
    alone = knn.knn_eval(config, mesh, model, params, 'vit')
    self.assertEqual(both['vit'], alone)
    source = sources.make_source(config.data, 'train')
    transform = features.EvalTransform(32, 32)
    images = np.stack([transform.map(source[i])['image'] for i in range(64)])
    labels = np.array([source[i]['label'] for i in range(64)])
    direct = knn.knn_classify(
      images.reshape(64, -1),
      labels,
      images[:24].reshape(24, -1),
      labels[:24],
      ks=(2, 4),
      num_classes=10,
    )
    for k in (2, 4):
      self.assertAlmostEqual(both['pixels'][k]['top1'], direct[k]['top1'])
      self.assertAlmostEqual(both['pixels'][k]['top5'], direct[k]['top5'])


class CompileOnceTest(absltest.TestCase):
  def test_no_compile_per_evaluation(self):
    """Other parameters, the same shapes: nothing compiles again.

    The parameters are arguments of one cached jitted feature function, not
    constants (which would compile each extraction again, and which JAX
    refuses for arrays spanning other processes' devices).
    """
    config = tiny_config.get_config()
    model = models.VisionTransformer(
      patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32
    )
    mesh = parallel.make_mesh(fsdp=2)
    params = []
    for seed in (0, 1):
      p = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
      p = p['params']
      params.append(jax.device_put(p, parallel.state_sharding(mesh, p, 1024)))
    first = knn.knn_eval(config, mesh, model, params[0])  # compiles
    compiled = []

    class Count(logging.Handler):
      def emit(self, record):
        if record.getMessage().startswith('Compiling'):
          compiled.append(record.getMessage()[:80])

    handler = Count()
    logger = logging.getLogger('jax._src.interpreters.pxla')
    logger.addHandler(handler)
    try:
      with jax.log_compiles(True):
        # Two k-NN evaluations: four extractions and two classifications.
        other = knn.knn_eval(config, mesh, model, params[1])
        again = knn.knn_eval(config, mesh, model, params[0])
    finally:
      logger.removeHandler(handler)
    self.assertEqual(compiled, [])
    self.assertEqual(again, first)
    self.assertNotEqual(other, first)  # the parameters did reach it
    self.assertEqual(features.jit_feature_fn(model, mesh)._cache_size(), 1)


if __name__ == '__main__':
  absltest.main()
