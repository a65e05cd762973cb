"""benchmarks/convergence.py: the official side's data and training setup.

The official code is loaded from ``$DINO_OFFICIAL_REPO`` or
``../shared/official-dino`` beside the repository (as CI lays it out).
"""

import io
import json
import math
import os
import random
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl.testing import absltest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import convergence  # noqa: E402

from configs import fashion_mnist  # noqa: E402
from dino_jax.data import sources  # noqa: E402

OFFICIAL_REPO = os.environ.get(
  'DINO_OFFICIAL_REPO',
  os.path.join(os.path.dirname(ROOT), 'shared', 'official-dino'),
)
HAVE_OFFICIAL = os.path.isfile(os.path.join(OFFICIAL_REPO, 'main_dino.py'))
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def setUpModule():
  global OFFICIAL
  OFFICIAL = convergence.load_official(OFFICIAL_REPO) if HAVE_OFFICIAL else None


def _image(seed=0, size=28):
  rng = np.random.RandomState(seed)
  return rng.randint(0, 256, (size, size, 3)).astype(np.uint8)


def _normalized(image):
  """ToTensor + Normalize written out: uint8 [H, W, 3] -> [3, H, W]."""
  return ((image / 255.0 - MEAN) / STD).transpose(2, 0, 1)


@absltest.skipUnless(HAVE_OFFICIAL, f'no official code at {OFFICIAL_REPO}')
class TransformTest(absltest.TestCase):
  def crop(self, **kwargs):
    args = dict(
      size=28,
      scale=(1.0, 1.0),
      blur_prob=0.0,
      flip_prob=0.0,
      jitter_prob=0.0,
      gray_prob=0.0,
    )
    return convergence.CropTransform(OFFICIAL.utils, **{**args, **kwargs})

  def test_full_crop_without_random_ops_is_the_normalization(self):
    # scale (1, 1) only accepts the whole 28 x 28 box: the resize is a copy.
    image = _image()
    x = self.crop()(Image.fromarray(image))
    self.assertEqual(x.dtype, torch.float32)
    np.testing.assert_allclose(x.numpy(), _normalized(image), atol=1e-6)

  def test_flip(self):
    image = _image(1)
    x = self.crop(flip_prob=1.0)(Image.fromarray(image))
    np.testing.assert_allclose(
      x.numpy(), _normalized(image[:, ::-1]), atol=1e-6
    )

  def test_grayscale_is_pil_luma(self):
    image = _image(2).astype(np.int64)
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    # PIL's fixed-point ITU-R 601-2 luma (SPEC §5.3).
    luma = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
    expected = np.stack([luma] * 3, -1).astype(np.uint8)
    x = self.crop(gray_prob=1.0)(Image.fromarray(image.astype(np.uint8)))
    np.testing.assert_allclose(x.numpy(), _normalized(expected), atol=1e-6)

  def test_solarization_is_the_official_class(self):
    image = _image(3)
    expected = np.where(image >= 128, 255 - image, image)
    x = self.crop(solarize_prob=1.0)(Image.fromarray(image))
    np.testing.assert_allclose(x.numpy(), _normalized(expected), atol=1e-6)
    t = self.crop(blur_prob=0.5, solarize_prob=0.2)
    self.assertIsInstance(t.blur, OFFICIAL.utils.GaussianBlur)
    self.assertIsInstance(t.solarize, OFFICIAL.utils.Solarization)

  def test_fashion_mnist_recipe_crops(self):
    config = fashion_mnist.get_config('parity')
    t = convergence.MultiCropTransform(OFFICIAL.utils, config.crops)
    self.assertEqual((t.global1.blur.prob, t.global2.blur.prob), (1.0, 0.1))
    self.assertEqual(t.local.blur.prob, 0.5)
    self.assertEqual(
      (t.local.blur.radius_min, t.local.blur.radius_max), (0.1, 0.3)
    )
    gray = Image.fromarray(_image(4)[..., 0]).convert('RGB')

    def draw(seed):
      torch.manual_seed(seed)
      random.seed(seed)
      return t(gray)

    crops = draw(0)
    shapes = [tuple(c.shape) for c in crops]
    self.assertEqual(shapes, [(3, 28, 28)] * 2 + [(3, 12, 12)] * 4)
    for a, b in zip(crops, draw(0), strict=True):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
    lo, hi = (0 - MEAN.max()) / STD.min(), (1 - MEAN.min()) / STD.min()
    for c in crops:
      self.assertBetween(float(c.min()), lo, hi)
      self.assertBetween(float(c.max()), lo, hi)


class OpsTest(absltest.TestCase):
  def test_hue_rotates_the_8_bit_hue(self):
    red = Image.new('RGB', (2, 2), (255, 0, 0))
    # H 0 + int(85 / 255 * 255) = 85 of 256: two sixths of a turn, green.
    green = convergence.adjust_hue(red, 85 / 255)
    self.assertEqual(green.getpixel((0, 0)), (0, 255, 0))
    back = convergence.adjust_hue(green, -85 / 255)
    self.assertEqual(back.getpixel((1, 1)), (255, 0, 0))

  def test_crop_box_bounds(self):
    torch.manual_seed(0)
    for _ in range(300):
      top, left, h, w = convergence.crop_box(28, 20, (0.05, 0.4))
      self.assertTrue(0 < h and top + h <= 20 and 0 < w and left + w <= 28)
      # round() of each side moves the area by at most one row and column.
      area = 28 * 20
      self.assertBetween(h * w, 0.05 * area - h - w - 1, 0.4 * area + h + w + 1)
      self.assertBetween(w / h, 3 / 4 - 1 / h, 4 / 3 + 1 / h)

  def test_crop_box_fallback_is_central(self):
    # No box of >= 90% area with aspect in [3/4, 4/3] fits 100 x 10.
    box = convergence.crop_box(100, 10, (0.9, 1.0))
    self.assertEqual(box, (0, (100 - 13) // 2, 10, round(10 * 4 / 3)))

  def test_sampler_continues_one_permutation_per_pass(self):
    s = convergence.StreamSampler(10, 4, seed=3)
    self.assertLen(s, 4)
    epochs = []
    for e in range(5):
      s.set_epoch(e)
      epochs += list(s)
    self.assertCountEqual(epochs[:10], range(10))
    self.assertCountEqual(epochs[10:20], range(10))
    s.set_epoch(2)
    self.assertEqual(list(s), epochs[8:12])
    self.assertNotEqual(epochs[:10], epochs[10:20])

  def test_spread_and_acceptance(self):
    self.assertEqual(
      convergence.spread([1.0, 2.0, 3.0]),
      dict(mean=2.0, min=1.0, max=3.0, std=1.0),
    )
    knn = lambda v: {'20': {'top1': v, 'top5': 99.0}}  # noqa: E731
    rows = [
      dict(side='official', seed=0, step=9, sec_per_step=1, knn=knn(70.0)),
      dict(side='official', seed=1, step=9, sec_per_step=1, knn=knn(72.0)),
      dict(side='jax', seed=0, step=9, sec_per_step=2, knn=knn(71.5)),
    ]
    (row,) = convergence.summarize(rows, ['jax', 'official'])
    self.assertTrue(row['jax_k20_mean_within_official'])
    self.assertEqual(row['official']['top1']['20']['min'], 70.0)
    self.assertIn('71.50', convergence.format_summary(row, ['jax', 'official']))

  def test_acceptance_band_is_one_point_where_the_seeds_agree(self):
    # Issue 17: within the official seed range, or within 1 point of the
    # official mean where that range is narrower.
    def within(official, jax):
      rows = [
        dict(side='official', seed=i, step=3, sec_per_step=1, knn=_knn(v))
        for i, v in enumerate(official)
      ] + [dict(side='jax', seed=0, step=3, sec_per_step=1, knn=_knn(jax))]
      (row,) = convergence.summarize(rows, ['jax', 'official'])
      return row['jax_k20_mean_within_official'], row['official_k20_band']

    self.assertEqual(within([60.0, 60.4], 61.1), (True, [59.2, 61.2]))
    self.assertEqual(within([60.0, 60.4], 61.3)[0], False)
    self.assertEqual(within([60.0, 60.4], 59.1)[0], False)
    self.assertEqual(within([58.0, 63.0], 62.9), (True, [58.0, 63.0]))
    self.assertEqual(within([58.0, 63.0], 63.1)[0], False)

  def test_summarize_files_of_both_sides(self):
    tmp = self.create_tempdir()
    recipe = dict(config='c.py', epochs=5, steps_per_epoch=72)

    def write(name, rows):
      path = os.path.join(tmp.full_path, name)
      with open(path, 'w') as f:
        f.writelines(json.dumps({**recipe, **r}) + '\n' for r in rows)
      return path

    run = lambda side, seed, v: dict(  # noqa: E731
      side=side, seed=seed, step=360, sec_per_step=1.5, knn=_knn(v)
    )
    jax_file = write(
      'jax.jsonl',
      # seed 0 rerun: the later row replaces the earlier one
      [run('jax', 0, 10.0), run('jax', 0, 58.0), run('jax', 1, 59.0)]
      + [{'summary': True, 'step': 360}],
    )
    official_file = write(
      'official.jsonl', [run('official', 0, 58.5), run('official', 1, 59.5)]
    )
    out = os.path.join(tmp.full_path, 'summary.jsonl')
    with mock.patch('sys.stdout', new=io.StringIO()) as stdout:
      convergence.main(['--summarize', jax_file, official_file, '--out', out])
    with open(out) as f:
      (row,) = [json.loads(line) for line in f]
    self.assertEqual(row['jax']['seeds'], [0, 1])
    self.assertEqual(row['jax']['top1']['20']['mean'], 58.5)
    self.assertEqual(row['official']['top1']['20']['min'], 58.5)
    self.assertTrue(row['jax_k20_mean_within_official'])
    self.assertIn('58.50', stdout.getvalue())

    other = write('other.jsonl', [{**run('jax', 2, 50.0), 'epochs': 15}])
    with self.assertRaisesRegex(SystemExit, 'mix recipes'):
      convergence.main(['--summarize', jax_file, other])

  def test_summary_of_the_baselines(self):
    run = lambda side, seed, v, **kw: dict(  # noqa: E731
      side=side, seed=seed, step=6, sec_per_step=1.0, knn=_knn(v), **kw
    )
    rows = [
      run('jax', 0, 50.0, random_init=_knn(70.0), raw_pixels=_knn(80.0)),
      run('jax', 1, 52.0, random_init=_knn(72.0), raw_pixels=_knn(80.0)),
      run('official', 0, 51.0, random_init=_knn(69.0)),
      run('official', 1, 53.0),  # its random init not scored
    ]
    (row,) = convergence.summarize(rows, ['jax', 'official'])
    self.assertEqual(row['jax']['random_init']['20']['mean'], 71.0)
    self.assertEqual(row['jax']['raw_pixels']['20']['std'], 0.0)
    self.assertEqual(row['official']['random_init']['20']['max'], 69.0)
    self.assertNotIn('raw_pixels', row['official'])
    text = convergence.format_summary(row, ['jax', 'official'])
    self.assertIn('random_init', text)
    self.assertIn(' 71.00 [ 70.00,  72.00]', text)

  def test_overrides_reach_the_runs_and_the_recipe(self):
    out = os.path.join(self.create_tempdir().full_path, 'jax.jsonl')
    calls = []

    def fake_train(config, workdir, *, seed, done, **kw):
      calls.append(kw)
      yield 6, {20: {'top1': 57.0, 'top5': 99.0}}, 1.0, {}

    argv = ['--sides', 'jax', '--seeds', '0', '--steps', '6', '--out', out]
    argv += ['--config.model.arch=resnet18', '--baselines']
    with (
      mock.patch.object(convergence, 'jax_train', fake_train),
      mock.patch('sys.stdout', new=io.StringIO()),
      mock.patch('sys.stderr', new=io.StringIO()),
    ):
      convergence.main(argv)
    self.assertEqual(calls[0]['overrides'], ['--config.model.arch=resnet18'])
    self.assertTrue(calls[0]['baselines'])
    with open(out) as f:
      first = json.loads(f.readline())
    self.assertEqual(first['overrides'], ['--config.model.arch=resnet18'])
    with (
      mock.patch('sys.stderr', new=io.StringIO()),
      self.assertRaisesRegex(SystemExit, 'error: .*model.no_such_field'),
    ):
      convergence.main(['--sides', 'jax', '--config.model.no_such_field=1'])

  def test_resnet_variant_is_the_measured_recipe(self):
    # configs/fashion_mnist.py:resnet is what docs/resnet.md measured with
    # the harness: the parity recipe, these overrides, 15 epochs.
    overrides = [
      '--config.model.arch=resnet18',
      '--config.model.resnet_width=16',
      '--config.batch_size=64',
      '--config.steps_per_epoch=60',
      '--config.model.use_bn_in_head=True',
      '--config.optim.name=sgd',
      '--config.optim.lr=0.1',
      '--config.optim.weight_decay=1e-4',
      '--config.optim.weight_decay_end=1e-4',
    ]
    path = os.path.join(ROOT, 'configs', 'fashion_mnist.py')
    measured = convergence.load_config(f'{path}:parity', 15, 900, overrides)
    variant = fashion_mnist.get_config('resnet')
    for group in ('model', 'optim', 'loss', 'crops', 'data'):
      self.assertEqual(variant[group].to_dict(), measured[group].to_dict())
    self.assertEqual(
      (variant.batch_size, variant.steps_per_epoch, variant.epochs),
      (64, 60, 15),
    )

  def test_rerun_trains_only_what_is_not_recorded(self):
    out = os.path.join(self.create_tempdir().full_path, 'jax.jsonl')
    recipe = dict(
      config='configs/fashion_mnist.py:parity',
      epochs=5,
      steps_per_epoch=72,
      max_train_images=-1,
      max_test_images=-1,
    )
    row = lambda seed, step, v, **kw: {  # noqa: E731
      **recipe,
      'side': 'jax',
      'seed': seed,
      'step': step,
      'sec_per_step': 1.0,
      'knn': _knn(v),
      **kw,
    }
    with open(out, 'w') as f:
      for r in [
        row(0, 3, 50.0),
        row(0, 6, 55.0),
        row(1, 3, 51.0),
        row(1, 6, 99.0, epochs=15),  # another schedule: not this recipe's
      ]:
        f.write(json.dumps(r) + '\n')
    calls = []

    def fake_train(config, workdir, *, seed, done, **kw):
      calls.append((seed, sorted(done)))
      if 6 not in done:
        yield 6, {20: {'top1': 57.0, 'top5': 99.0}}, 1.0, {}

    argv = ['--sides', 'jax', '--seeds', '0,1', '--steps', '6']
    argv += ['--eval_steps', '3,6', '--out', out]
    with (
      mock.patch.object(convergence, 'jax_train', fake_train),
      mock.patch('sys.stdout', new=io.StringIO()),
      mock.patch('sys.stderr', new=io.StringIO()),
    ):
      convergence.main(argv)
    self.assertEqual(calls, [(0, [3, 6]), (1, [3])])
    with open(out) as f:
      summaries = [r for r in map(json.loads, f) if r.get('summary')]
    self.assertEqual([r['step'] for r in summaries], [3, 6])
    self.assertEqual(summaries[0]['jax']['top1']['20']['mean'], 50.5)
    self.assertEqual(summaries[1]['jax']['top1']['20']['mean'], 56.0)


def _knn(top1):
  return {'20': {'top1': top1, 'top5': 99.0}}


def _tiny_config():
  config = fashion_mnist.get_config('parity')
  config.batch_size = 4
  config.steps_per_epoch = 2
  config.epochs = 2
  config.optim.warmup_epochs = 1
  config.optim.freeze_last_layer = 1
  config.model.embed_dim = 16
  config.model.depth = 1
  config.model.num_heads = 2
  config.model.out_dim = 32
  config.model.head_hidden_dim = 16
  config.model.head_bottleneck_dim = 8
  config.crops.local_number = 2
  config.eval.batch_size = 5
  return config


@absltest.skipUnless(HAVE_OFFICIAL, f'no official code at {OFFICIAL_REPO}')
class OfficialTrainTest(absltest.TestCase):
  def test_three_steps_of_train_one_epoch(self):
    config = _tiny_config()
    source = sources.SyntheticSource(size=6, image_size=28)
    seen = {}

    def on_eval(step, backbone):
      feats, labels = convergence.torch_features(
        backbone, source, 6, config.eval
      )
      seen[step] = (feats, labels)

    cuda, logger = torch.Tensor.cuda, OFFICIAL.utils.MetricLogger
    with convergence.single_process_group():
      result = convergence.official_train(
        OFFICIAL,
        config,
        source,
        seed=0,
        epochs=config.epochs,
        steps=3,  # into the second epoch, stopped inside it
        eval_steps=(1, 3),
        on_eval=on_eval,
      )
    self.assertIs(torch.Tensor.cuda, cuda)
    self.assertIs(OFFICIAL.utils.MetricLogger, logger)
    o = result['objects']
    self.assertIsInstance(o['dino_loss'], OFFICIAL.main_dino.DINOLoss)
    self.assertEqual(o['dino_loss'].ncrops, 4)
    self.assertIsInstance(o['optimizer'], torch.optim.AdamW)
    self.assertIsInstance(o['student'].module, OFFICIAL.utils.MultiCropWrapper)
    self.assertIsInstance(o['teacher'].head, OFFICIAL.vits.DINOHead)
    lr = OFFICIAL.utils.cosine_scheduler(
      2e-3 * 4 / 256, 1e-6, 2, 2, warmup_epochs=1
    )
    np.testing.assert_array_equal(o['lr_schedule'], lr)
    groups = o['optimizer'].param_groups
    self.assertEqual(groups[0]['lr'], lr[2])  # the last step, index 2
    self.assertEqual(groups[0]['weight_decay'], o['wd_schedule'][2])
    self.assertEqual(groups[1]['weight_decay'], 0.0)
    self.assertLen(result['losses'], 3)
    self.assertTrue(all(math.isfinite(v) for v in result['losses']))
    self.assertGreater(float(o['dino_loss'].center.abs().sum()), 0.0)
    self.assertEqual(sorted(seen), [1, 3])
    self.assertEqual(seen[1][0].shape, (6, 16))
    np.testing.assert_array_equal(seen[1][1], np.arange(6) % 10)
    # Step 1 has lr 0 (warmup starts at 0); steps 2-3 move the EMA teacher.
    self.assertFalse(np.allclose(seen[1][0], seen[3][0]))
    s = dict(o['student'].module.backbone.named_parameters())
    t = dict(o['teacher'].backbone.named_parameters())
    self.assertFalse(torch.equal(s['pos_embed'], t['pos_embed']))
    self.assertGreater(result['sec_per_step'], 0.0)

  def test_resnet_recipe_is_built_as_main_dino(self):
    # main_dino for a torchvision arch: the ResNet without fc (Identity in
    # MultiCropWrapper), the head on fc's 8 * width inputs, BatchNorm in
    # train mode (one backbone pass per resolution), the official LARS.
    config = _tiny_config()
    config.model.arch = 'resnet18'
    config.model.resnet_width = 8
    config.model.use_bn_in_head = True
    config.optim.name = 'lars'
    source = sources.SyntheticSource(size=6, image_size=28)
    seen = {}

    def on_eval(step, backbone):
      seen[step] = convergence.torch_features(backbone, source, 6, config.eval)[
        0
      ]

    with convergence.single_process_group():
      result = convergence.official_train(
        OFFICIAL,
        config,
        source,
        seed=0,
        epochs=config.epochs,
        steps=2,
        eval_steps=(0, 2),  # 0: the random-init teacher (--baselines)
        on_eval=on_eval,
      )
    o = result['objects']
    self.assertIsInstance(o['optimizer'], OFFICIAL.utils.LARS)
    student, teacher = o['student'].module, o['teacher']
    for net in (student, teacher):
      self.assertIsInstance(net.backbone.fc, torch.nn.Identity)
      bns = [
        m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)
      ]
      self.assertLen(bns, 1 + 2 * 8 + 3)  # stem, 8 blocks, 3 downsamples
      linears = [m for m in net.head.mlp if isinstance(m, torch.nn.Linear)]
      self.assertEqual(linears[0].in_features, 64)
      head_bns = [
        m for m in net.head.mlp if isinstance(m, torch.nn.BatchNorm1d)
      ]
      self.assertLen(head_bns, 2)
    # The parameter count of dino_jax's resnet18 at width 8 (fc removed).
    from dino_jax.models import resnet

    model = resnet.ARCHS['resnet18'](width=8)
    shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3)))
    )
    expected = sum(x.size for x in jax.tree.leaves(shapes['params']))
    count = sum(p.numel() for p in student.backbone.parameters())
    self.assertEqual(count, expected)
    # Student: globals and locals in two passes a step; teacher: globals.
    self.assertEqual(int(student.backbone.bn1.num_batches_tracked), 4)
    self.assertEqual(int(teacher.backbone.bn1.num_batches_tracked), 2)
    self.assertGreater(float(teacher.backbone.bn1.running_mean.abs().sum()), 0)
    self.assertTrue(teacher.training)  # the hook restored train mode
    self.assertEqual(sorted(seen), [0, 2])
    self.assertEqual(seen[0].shape, (6, 64))
    # Step 1 has lr 0; step 2 moves the teacher, and its running statistics
    # (used by the eval-mode features) moved at both steps.
    self.assertFalse(np.allclose(seen[0], seen[2]))
    self.assertLen(result['losses'], 2)
    self.assertTrue(all(math.isfinite(v) for v in result['losses']))


if __name__ == '__main__':
  absltest.main()
