"""Linear probe: learns a separable problem; SPEC §7.2 details; the lr sweep."""

import contextlib
import io
import json
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from PIL import Image
from test_eval_cli import error_lines, run_in_process, tiny_workdir

from dino_jax import config as config_lib
from dino_jax import models, parallel, storage
from dino_jax.data import multicrop
from dino_jax.evaluation import features, linear


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


def probe_config(**linear_fields):
  """The default config at the tiny sizes ColorSource needs."""
  config = config_lib.default_config()
  config.data.canvas_size = 40
  config.data.num_workers = 0
  config.eval.resize_size = 32
  config.eval.crop_size = 32
  config.eval.batch_size = 16
  config.linear.batch_size = 16
  config.linear.n_last_blocks = 2
  for name, value in linear_fields.items():
    config.linear[name] = value
  return config


def run_probe(config, model, params):
  """train_linear_probe with every split read from ColorSource."""
  original = linear.sources.make_source
  linear.sources.make_source = lambda data, split=None: ColorSource()
  try:
    return linear.train_linear_probe(
      config, parallel.make_mesh(), model, params
    )
  finally:
    linear.sources.make_source = original


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
    config.linear.sweep = False  # the official protocol
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
    feats = features.probe_features(model, params, images, 1, True)
    tokens = model.apply({'params': params}, images, method='features')
    np.testing.assert_allclose(feats[:, 0::2], tokens[:, 0], atol=1e-6)
    np.testing.assert_allclose(feats[:, 1::2], tokens[:, 1:].mean(1), atol=1e-6)
    with self.assertRaisesRegex(ValueError, 'avgpool'):
      features.probe_features(model, params, images, 2, True)

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


class SweepTest(parameterized.TestCase):
  def test_default_lrs(self):
    lc = config_lib.default_config().linear
    self.assertTrue(lc.sweep)
    self.assertEqual(lc.val_fraction, 0.1)
    np.testing.assert_allclose(lc.sweep_lrs, np.logspace(-4, -1, 10))
    lc.batch_size = 512
    np.testing.assert_allclose(
      linear.sweep_scales(lc), 2 * np.logspace(-4, -1, 10)
    )

  def test_vmapped_steps_equal_separate_official_steps(self):
    # The official single-lr optimizer (the schedule at lr), one head at a
    # time, against all heads in one vmapped step at a unit schedule.
    rs = np.random.RandomState(0)
    feats = jnp.asarray(rs.normal(size=(5, 8, 12)), jnp.float32)
    labels = jnp.asarray(rs.randint(0, 4, (5, 8)))
    lrs = np.array([0.01, 0.3, 2.0])
    steps, epochs = 2, 3
    head = linear.init_linear(jax.random.PRNGKey(0), 12, 4)
    unit = linear._sgd(linear.epoch_lrs(1.0, epochs), steps)
    heads = linear.sweep_heads(head, len(lrs))
    state = jax.vmap(unit.init)(heads)
    sweep = jax.jit(
      lambda h, s, x, y: linear._sweep_update(
        unit, jnp.asarray(lrs, jnp.float32), h, s, x, y
      )
    )
    for i in range(steps * epochs):
      heads, state, losses = sweep(heads, state, feats[i % 5], labels[i % 5])
    for h, lr in enumerate(lrs):
      tx = linear._sgd(linear.epoch_lrs(lr, epochs), steps)
      one, one_state = head, tx.init(head)
      update = jax.jit(lambda a, b, x, y, tx=tx: linear._update(tx, a, b, x, y))
      for i in range(steps * epochs):
        one, one_state, loss = update(
          one, one_state, feats[i % 5], labels[i % 5]
        )
      for name in ('kernel', 'bias'):
        np.testing.assert_allclose(
          heads[name][h], one[name], atol=1e-6, rtol=1e-6
        )
      np.testing.assert_allclose(losses[h], loss, rtol=1e-6)
      # Different lrs do train differently: the comparison can fail.
      self.assertGreater(np.abs(heads['kernel'][h] - head['kernel']).max(), 0)
    self.assertGreater(
      np.abs(heads['kernel'][0] - heads['kernel'][2]).max(), 1e-3
    )

  @parameterized.parameters(False, True)
  def test_sweep_equals_each_lr_alone(self, augment):
    # The whole probe (features, crops, held-out split): two lrs at once
    # give each lr's losses and val accuracy of a sweep of it alone. The
    # random crops on raw pixels (no ViT in the step: a quick compile).
    model, params = (None, None) if augment else tiny()
    lrs = (0.01, 4.0)
    together = run_probe(
      probe_config(epochs=2, sweep_lrs=lrs, augment=augment), model, params
    )
    self.assertEqual(together['train_images'], 86)  # 96 - 10 held out
    self.assertEqual(together['val_images'], 10)
    for h, lr in enumerate(lrs):
      alone = run_probe(
        probe_config(epochs=2, sweep_lrs=(lr,), augment=augment),
        model,
        params,
      )
      for a, b in zip(together['history'], alone['history'], strict=True):
        np.testing.assert_allclose(a['loss'][h], b['loss'][0], rtol=1e-6)
        self.assertEqual(a['val_top1'][h], b['val_top1'][0])
    losses = together['history'][-1]['loss']
    self.assertGreater(max(losses) - min(losses), 1e-3)

  def test_holdout_split(self):
    train, val = linear.holdout_split(96, 0.1, 0)
    self.assertLen(val, 10)
    self.assertEqual(np.intersect1d(train, val).size, 0)
    np.testing.assert_array_equal(np.union1d(train, val), np.arange(96))
    again = linear.holdout_split(96, 0.1, 0)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], val)
    other = linear.holdout_split(96, 0.1, 1)[1]
    self.assertFalse(np.array_equal(other, val))  # the seed matters
    self.assertLen(linear.holdout_split(3, 0.1, 0)[1], 1)  # at least one
    with self.assertRaisesRegex(ValueError, 'val_fraction=1.5'):
      linear.holdout_split(96, 1.5, 0)

  def test_probe_reads_disjoint_rows(self):
    # The rows the sweep trains on and validates on, as it reads them.
    read = []

    class Recording(ColorSource):
      def __getitem__(self, i):
        read.append(i)
        return super().__getitem__(i)

    config = probe_config(epochs=1, sweep_lrs=(0.1,), augment=False)
    config.eval.max_test_images = 1  # one test row read first: row 0
    original = linear.sources.make_source
    linear.sources.make_source = lambda data, split=None: Recording()
    try:
      linear.train_linear_probe(config, parallel.make_mesh(), None, None)
    finally:
      linear.sources.make_source = original
    train, val = linear.holdout_split(96, 0.1, 0)
    # Extracted once each, in order: the held-out rows, then the rest.
    self.assertEqual(read[0], 0)
    read = read[1:]
    self.assertEqual(sorted(set(read)), list(range(96)))
    self.assertEqual(read[: len(val)], list(val))
    self.assertEqual(sorted(set(read[len(val) :])), list(train))

  def test_pixels_sweep_picks_the_best_val_lr(self):
    # Raw pixels (backbone None) of the colour classes: separable.
    lrs = (1e-7, 1e-5, 1e-3, 0.1)
    config = probe_config(epochs=3, sweep_lrs=lrs, augment=False)
    config.linear.sweep = False  # linear_sweep_eval sweeps anyway
    original = linear.sources.make_source
    linear.sources.make_source = lambda data, split=None: ColorSource()
    try:
      result = linear.linear_sweep_eval(
        config, parallel.make_mesh(), None, None
      )
    finally:
      linear.sources.make_source = original
    self.assertFalse(config.linear.sweep)  # the caller's config unchanged
    self.assertEqual(result['feature_dim'], 32 * 32 * 3)
    val = result['val_top1']
    self.assertEqual(val[result['chosen_index']], max(val))
    self.assertEqual(result['chosen_lr'], lrs[result['chosen_index']])
    self.assertAlmostEqual(
      result['chosen_scaled_lr'], result['chosen_lr'] * 16 / 256
    )
    self.assertGreater(max(val) - min(val), 20)  # the choice matters
    self.assertGreaterEqual(result['top1'], 95.0)
    self.assertEqual(result['top5'], 100.0)  # 3 classes
    self.assertEqual(result['best_top1'], result['top1'])
    self.assertNotIn('linear', result)  # the weights are not returned
    self.assertLen(result['history'], 3)

  def test_write_results_local(self):
    root = self.create_tempdir().full_path
    result = {
      'sweep': False,
      'best_top1': 50.0,
      'best_epoch': 2,
      'linear': {'kernel': np.ones((4, 3)), 'bias': np.arange(3.0)},
    }
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      path, weights = linear.write_results(root, 7, result)
    self.assertEqual(path, os.path.join(root, 'eval', 'linear.json'))
    self.assertIn(f'wrote {path} and {weights}', out.getvalue())
    record = json.loads(storage.read_text(path))
    self.assertEqual(
      record, {'step': 7, 'sweep': False, 'best_top1': 50.0, 'best_epoch': 2}
    )
    with np.load(weights) as npz:
      np.testing.assert_array_equal(npz['bias'], [0, 1, 2])
      np.testing.assert_array_equal(npz['kernel'], np.ones((4, 3)))


CLI_OVERRIDES = (
  '--config.linear.epochs=2',
  '--config.linear.batch_size=8',
  '--config.linear.augment=false',
  '--config.linear.n_last_blocks=2',
)


class CliTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.mkdtemp(prefix='linear_cli_')
    tiny_workdir(cls.root)  # 64 synthetic images, the test split the same

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root, ignore_errors=True)
    super().tearDownClass()

  def test_sweep_writes_record_and_weights(self):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      status, stderr = run_in_process(
        linear,
        [
          f'--workdir={self.root}',
          *CLI_OVERRIDES,
          '--config.linear.sweep_lrs=(0.001, 1.0)',
        ],
      )
    self.assertEqual(status, 0, stderr)
    path = os.path.join(self.root, 'eval', 'linear.json')
    weights = os.path.join(self.root, 'eval', 'linear_weights.npz')
    self.assertIn(f'wrote {path} and {weights}', out.getvalue())
    with open(path) as f:
      record = json.load(f)
    self.assertEqual(record['step'], 0)
    self.assertEqual(record['lrs'], [0.001, 1.0])
    np.testing.assert_allclose(record['scaled_lrs'], [0.001 / 32, 1 / 32])
    self.assertEqual((record['train_images'], record['val_images']), (58, 6))
    val = record['val_top1']
    self.assertLen(val, 2)
    self.assertEqual(val[record['chosen_index']], max(val))
    self.assertEqual(record['chosen_lr'], record['lrs'][record['chosen_index']])
    self.assertBetween(record['top1'], 0.0, 100.0)
    self.assertGreaterEqual(record['top5'], record['top1'])
    with np.load(weights) as npz:
      self.assertEqual(npz['kernel'].shape[0], 64)  # 2 blocks x 32
      self.assertEqual(npz['bias'].shape, npz['kernel'].shape[1:])

  def test_bad_sweep_values_write_nothing(self):
    for override, value in (
      ('--config.linear.val_fraction=1.5', 'linear.val_fraction=1.5'),
      ('--config.linear.sweep_lrs=(0.1, -1.0)', 'linear.sweep_lrs=(0.1, -1.0)'),
    ):
      root = os.path.join(self.create_tempdir().full_path, 'w')
      shutil.copytree(
        os.path.join(self.root, 'checkpoints'),
        os.path.join(root, 'checkpoints'),
      )
      status, stderr = run_in_process(
        linear, [f'--workdir={root}', *CLI_OVERRIDES, override]
      )
      self.assertEqual(status, 1, stderr)
      lines = error_lines(stderr)
      self.assertLen(lines, 1, stderr)
      self.assertIn(value, lines[0])
      self.assertNotIn('Traceback', stderr)
      self.assertEqual(os.listdir(root), ['checkpoints'])  # no eval/


def test_write_results_gcs(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a stray local 'gs:' folder would land here
  name = f'lin{os.getpid()}'
  url = gcs.create_bucket(name)
  result = {
    'sweep': True,
    'lrs': [0.1],
    'chosen_lr': 0.1,
    'top1': 90.0,
    'top5': 100.0,
    'linear': {'kernel': np.ones((2, 3)), 'bias': np.zeros(3)},
  }
  path, weights = linear.write_results(f'{url}/run', 3, result)
  assert path == f'{url}/run/eval/linear.json'
  listed = sorted(gcs.list(name))
  assert listed[:2] == ['run/eval/linear.json', 'run/eval/linear_weights.npz']
  # and the run's record (issue 42), never replaced by a later run
  assert len(listed) == 3
  assert re.fullmatch(
    r'run/eval/records/linear-step3-\d{8}T\d+Z\.json', listed[2]
  )
  assert json.loads(gcs.read(name, 'run/eval/linear.json'))['top1'] == 90.0
  npz = np.load(io.BytesIO(gcs.read(name, 'run/eval/linear_weights.npz')))
  np.testing.assert_array_equal(npz['kernel'], np.ones((2, 3)))
  assert not os.path.exists(tmp_path / 'gs:')


if __name__ == '__main__':
  absltest.main()
