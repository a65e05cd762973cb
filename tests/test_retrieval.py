"""Retrieval on revisited Oxford / Paris: the metric, the features, the CLI.

The official code (utils.py, vision_transformer.py) is loaded by path from
``$DINO_OFFICIAL_REPO`` or ``../shared/official-dino`` beside the
repository (as CI lays it out); NumPy 2 lacks ``np.in1d`` and Pillow 10+
``Image.ANTIALIAS``: both are shimmed here, in the comparisons only.
"""

import contextlib
import functools
import importlib.util
import io
import json
import os
import pickle
import sys
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl.testing import absltest
from PIL import Image
from test_eval_cli import error_lines, run_in_process, tiny_workdir

from dino_jax import interop, models
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib
from dino_jax.evaluation import retrieval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_REPO = os.environ.get(
  'DINO_OFFICIAL_REPO',
  os.path.join(os.path.dirname(ROOT), 'shared', 'official-dino'),
)
HAVE_OFFICIAL = os.path.isfile(os.path.join(OFFICIAL_REPO, 'utils.py'))
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
IMSIZE = 32


def _load(name):
  """``name``.py of the official repo, by path (registered as ``name``)."""
  if name in sys.modules and os.path.dirname(
    os.path.abspath(sys.modules[name].__file__)
  ) == os.path.abspath(OFFICIAL_REPO):
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(
    name, os.path.join(OFFICIAL_REPO, f'{name}.py')
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # vision_transformer imports utils
  spec.loader.exec_module(module)
  return module


def official():
  utils = _load('utils')
  return utils, _load('vision_transformer')


def in1d_shim():
  return mock.patch.object(np, 'in1d', np.isin, create=True)


def official_protocol(gnd, protocol):
  """The official script's Medium / Hard gnd (eval_image_retrieval.py)."""
  out = []
  for g in gnd:
    if protocol == 'medium':
      out.append(
        {
          'ok': np.concatenate([g['easy'], g['hard']]),
          'junk': np.concatenate([g['junk']]),
        }
      )
    else:
      out.append(
        {
          'ok': np.concatenate([g['hard']]),
          'junk': np.concatenate([g['junk'], g['easy']]),
        }
      )
  return out


def random_gnd(rng, n, nq, overlap=False):
  gnd = []
  for q in range(nq):
    perm = rng.permutation(n)
    a, b, c = rng.randint(0, 8, 3)
    if q == 0:
      a = b = 0  # no positives at all: left out of both means
    if q == 1:
      b = 0  # no hard positives: left out of Hard only
    if q == 2:
      b = max(b, 1)  # every mean has a query
    easy, hard, junk = perm[:a], perm[a : a + b], perm[a + b : a + b + c]
    if overlap and len(easy):
      junk = np.concatenate([junk, easy[:1]])
    gnd.append({'easy': easy, 'hard': hard, 'junk': junk, 'bbx': None})
  return gnd


class MetricTest(absltest.TestCase):
  def test_hand_computed(self):
    # Ranking: junk, positive, negative, positive (2 positives).
    ranks = np.array([[9], [1], [5], [2]])
    gnd = [{'ok': [1, 2], 'junk': [9]}]
    mean_ap, aps, mp, prs = retrieval.compute_map(ranks, gnd, [1, 5, 10])
    # Positions without junk: 0, 2; trapezoids (1 + 1) / 2 / 2 and
    # (1/2 + 2/3) / 2 / 2.
    self.assertAlmostEqual(mean_ap, 0.5 + (0.5 + 2 / 3) / 4, places=15)
    # 1-based positions 1, 3: k=1 -> 1/1; k=5, 10 -> kq = 3 -> 2/3.
    np.testing.assert_allclose(mp, [1.0, 2 / 3, 2 / 3], rtol=0, atol=1e-15)
    np.testing.assert_allclose(prs, [[1.0, 2 / 3, 2 / 3]], atol=1e-15)
    self.assertEqual(aps.shape, (1,))
    # A query without positives is NaN and left out of the mean.
    mean_ap, aps, mp, _ = retrieval.compute_map(
      np.array([[1, 1], [2, 2]]), [{'ok': [], 'junk': []}, {'ok': [2]}], [1]
    )
    self.assertTrue(np.isnan(aps[0]))
    # One positive at position 1: precision 0 before it, 1/2 at it.
    self.assertAlmostEqual(mean_ap, (0 + 1 / 2) / 2, places=15)
    np.testing.assert_allclose(mp, [0.0])  # kq = min(2, 1) = 1: no hit

  def test_protocols(self):
    gnd = [{'easy': [1, 2], 'hard': [3], 'junk': [4]}]
    (medium,) = retrieval.protocol_gnd(gnd, 'medium')
    (hard,) = retrieval.protocol_gnd(gnd, 'hard')
    self.assertEqual(sorted(medium['ok']), [1, 2, 3])
    self.assertEqual(sorted(medium['junk']), [4])
    self.assertEqual(sorted(hard['ok']), [3])
    self.assertEqual(sorted(hard['junk']), [1, 2, 4])

  @absltest.skipUnless(HAVE_OFFICIAL, f'no official code at {OFFICIAL_REPO}')
  def test_equals_official_compute_map(self):
    utils, _ = official()
    ks = [1, 5, 10]
    rng = np.random.RandomState(0)
    for trial in range(30):
      n, nq = rng.randint(12, 60), rng.randint(3, 7)
      ranks = np.stack([rng.permutation(n) for _ in range(nq)], axis=1)
      gnd = random_gnd(rng, n, nq, overlap=trial % 3 == 2)
      for protocol in ('medium', 'hard'):
        with in1d_shim():
          want = utils.compute_map(ranks, official_protocol(gnd, protocol), ks)
        got = retrieval.compute_map(
          ranks, retrieval.protocol_gnd(gnd, protocol), ks
        )
        for w, g in zip(want, got, strict=True):
          np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)
      # evaluate(): the same numbers, in percent.
      results = retrieval.evaluate(ranks, gnd)
      with in1d_shim():
        want_h = utils.compute_map(ranks, official_protocol(gnd, 'hard'), ks)
      self.assertAlmostEqual(results['hard']['map'], 100 * want_h[0], 10)
      self.assertAlmostEqual(results['hard']['mp@5'], 100 * want_h[2][1], 10)
      self.assertIsNone(results['medium']['aps'][0])


class ResizeTest(absltest.TestCase):
  def test_matches_torch_interpolate_scale_factor(self):
    x = np.random.RandomState(0).randn(1, 37, 29, 3).astype(np.float32)
    resize = jax.jit(retrieval.resize_bilinear, static_argnums=1)
    for s in retrieval.SCALES[1:]:
      want = torch.nn.functional.interpolate(
        torch.from_numpy(x.transpose(0, 3, 1, 2)),
        scale_factor=s,
        mode='bilinear',
        align_corners=False,
      ).numpy()
      got = np.asarray(resize(jnp.asarray(x), s))
      self.assertEqual(got.shape, want.transpose(0, 2, 3, 1).shape)
      np.testing.assert_allclose(
        got, want.transpose(0, 2, 3, 1), rtol=0, atol=1e-5
      )
    # jax.image.resize maps by size ratio (37 / 26), not by 1 / s: it differs
    # wherever H * s is not whole.
    other = jax.jit(
      functools.partial(
        jax.image.resize, shape=(1, 26, 20, 3), method='linear', antialias=False
      )
    )(jnp.asarray(x))
    self.assertGreater(
      np.abs(np.asarray(other) - resize(x, SQRT_HALF)).max(),
      1e-3,
    )


SQRT_HALF = retrieval.SCALES[1]


def make_fixture(root, dataset='roxford5k'):
  """8 database images and 2 queries (database images 0 and 5, with boxes
  of one size).

  Distinct colours and textures, so a random-init ViT ranks them apart.
  Sizes: larger than IMSIZE (thumbnailed) and one smaller (kept as is).
  """
  folder = os.path.join(root, dataset, 'jpg')
  os.makedirs(folder)
  rng = np.random.RandomState(0)
  # (w, h): few shapes, few compiles.
  sizes = [(40, 56)] * 7 + [(24, 20)]
  names = []
  for i, (w, h) in enumerate(sizes):
    base = rng.randint(0, 256, 3)
    yy, xx = np.mgrid[:h, :w]
    stripes = (np.sin(xx * (i + 1) / 3.0 + yy * i / 5.0)[..., None] + 1) * 60
    noise = rng.randint(0, 40, (h, w, 3))
    image = np.clip(base * 0.6 + stripes + noise, 0, 255).astype(np.uint8)
    names.append(f'db_{i}')
    Image.fromarray(image).save(os.path.join(folder, f'db_{i}.jpg'), quality=95)
  qnames = ['query_0', 'query_1']
  for q, src in zip(qnames, (0, 5), strict=True):
    Image.open(os.path.join(folder, f'db_{src}.jpg')).save(
      os.path.join(folder, f'{q}.jpg'), quality=95
    )
  gnd = [
    {
      'bbx': [0.0, 20.0, 40.0, 52.0],
      'easy': np.array([0, 1]),
      'hard': np.array([2]),
      'junk': np.array([3]),
    },
    {
      'bbx': [0.0, 10.0, 40.0, 42.0],
      'easy': np.array([5]),
      'hard': np.array([4, 6]),
      'junk': np.array([7]),
    },
  ]
  with open(os.path.join(root, dataset, f'gnd_{dataset}.pkl'), 'wb') as f:
    pickle.dump({'imlist': names, 'qimlist': qnames, 'gnd': gnd}, f)
  return os.path.join(root, dataset)


def record_gnd(root, dataset):
  with open(os.path.join(root, dataset, f'gnd_{dataset}.pkl'), 'rb') as f:
    return pickle.load(f)['gnd']


def by_hand(path, bbx=None, resample=Image.Resampling.LANCZOS):
  """The official loading written out: [1, 3, H, W] float32 (torch order)."""
  with open(path, 'rb') as f:
    image = Image.open(f).convert('RGB')
  if bbx is not None:
    image = image.crop(tuple(bbx))
  image.thumbnail((IMSIZE, IMSIZE), resample)
  x = (np.asarray(image, np.float64) / 255.0 - MEAN) / STD
  return x.transpose(2, 0, 1)[None].astype(np.float32)


class CliTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    cls.tmp = tempfile.mkdtemp(prefix='retrieval_')
    cls.data = os.path.join(cls.tmp, 'data')
    make_fixture(cls.data)
    make_fixture(cls.data, 'rparis6k')
    cls.workdir = os.path.join(cls.tmp, 'w')
    tiny_workdir(cls.workdir)

  def run_tool(self, *argv):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
      status, stderr = run_in_process(retrieval, list(argv))
    return status, stdout.getvalue(), stderr

  def test_end_to_end_equals_metric_from_features(self):
    status, out, err = self.run_tool(
      f'--workdir={self.workdir}',
      f'--data_root={self.data}',
      '--dataset=roxford5k',
      f'--imsize={IMSIZE}',
    )
    self.assertEqual(status, 0, err)
    with open(os.path.join(self.workdir, 'eval/retrieval_roxford5k.json')) as f:
      record = json.load(f)
    self.assertEqual(record['step'], 0)
    self.assertEqual(
      (record['imsize'], record['multiscale'], record['queries_cropped']),
      (IMSIZE, False, True),
    )
    # Features recomputed here: loading by hand, the teacher's CLS.
    config, _, state, _ = workdir_lib.load_workdir(self.workdir, [])
    _, teacher = step_lib.build_models(config)
    backbone, params = teacher.backbone, state.teacher['backbone']
    folder = os.path.join(self.data, 'roxford5k')
    with open(os.path.join(folder, 'gnd_roxford5k.pkl'), 'rb') as f:
      cfg = pickle.load(f)

    apply = jax.jit(backbone.apply)  # eager flax: seconds per image

    def feats(names, boxes):
      rows = []
      for name, bbx in zip(names, boxes, strict=True):
        x = by_hand(os.path.join(folder, 'jpg', f'{name}.jpg'), bbx)
        cls = apply({'params': params}, x.transpose(0, 2, 3, 1))
        rows.append(np.asarray(cls, np.float64)[0])
      rows = np.stack(rows)
      return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    db = feats(cfg['imlist'], [None] * 8)
    q = feats(cfg['qimlist'], [g['bbx'] for g in cfg['gnd']])
    ranks = np.argsort(-(db @ q.T), axis=0)
    for protocol in ('medium', 'hard'):
      want, _, want_mp, _ = retrieval.compute_map(
        ranks, retrieval.protocol_gnd(cfg['gnd'], protocol), (1, 5, 10)
      )
      self.assertAlmostEqual(record[protocol]['map'], 100 * want, 9)
      for k, p in zip((1, 5, 10), want_mp, strict=True):
        self.assertAlmostEqual(record[protocol][f'mp@{k}'], 100 * p, 9)
    m, h = record['medium']['map'], record['hard']['map']
    self.assertIn(f'roxford5k (step 0): mAP M: {m:.2f}, H: {h:.2f}', out)
    self.assertIn('mP@k[1, 5, 10] M: ', out)

  def test_official_and_multiscale_flags_reach_the_evaluation(self):
    calls = []

    def fake(model, params, cfg, imsize, *, multiscale, crop_queries):
      calls.append((len(cfg['db_paths']), imsize, multiscale, crop_queries))
      ranks = np.tile(np.arange(8)[:, None], (1, 2))
      return retrieval.evaluate(ranks, cfg['gnd']), None, None

    with mock.patch.object(retrieval, 'retrieval_eval', fake):
      status, out, err = self.run_tool(
        f'--workdir={self.workdir}',
        f'--data_root={self.data}',
        '--dataset=rparis6k',
        '--imsize=48',
        '--multiscale',
        '--official',
      )
    self.assertEqual(status, 0, err)
    self.assertEqual(calls, [(8, 48, True, False)])
    with open(os.path.join(self.workdir, 'eval/retrieval_rparis6k.json')) as f:
      record = json.load(f)
    self.assertEqual(
      (record['dataset'], record['multiscale'], record['queries_cropped']),
      ('rparis6k', True, False),
    )
    # The record holds the metric of the ranking the evaluation returned.
    want, _, _, _ = retrieval.compute_map(
      np.tile(np.arange(8)[:, None], (1, 2)),
      retrieval.protocol_gnd(record_gnd(self.data, 'rparis6k'), 'medium'),
    )
    self.assertAlmostEqual(record['medium']['map'], 100 * want, 10)
    self.assertIn('rparis6k (step 0): mAP M: ', out)

  def test_bad_input_is_one_error_line_and_writes_nothing(self):
    empty = os.path.join(self.tmp, 'empty')
    os.makedirs(os.path.join(empty, 'rparis6k'))
    cases = [
      ([f'--data_root={self.tmp}/nowhere'], 'is not a directory'),
      ([], '--data_root is required'),
      ([f'--data_root={empty}', '--dataset=roxford5k'], 'no roxford5k/'),
      ([f'--data_root={empty}', '--dataset=rparis6k'], 'gnd_rparis6k.pkl'),
      ([f'--data_root={self.data}', '--imsize=0'], '--imsize=0'),
      ([f'--data_root={self.data}', '--dataset=paris'], 'paris'),
    ]
    fresh = os.path.join(self.tmp, 'fresh')
    for argv, message in cases:
      status, _, err = self.run_tool(f'--workdir={fresh}', *argv)
      self.assertEqual(status, 1, argv)
      (line,) = error_lines(err)
      self.assertIn(message, line)
      self.assertFalse(os.path.exists(fresh), argv)


@absltest.skipUnless(HAVE_OFFICIAL, f'no official code at {OFFICIAL_REPO}')
class ParityTest(absltest.TestCase):
  """The same random-init ViT in dino_jax and in the official code."""

  @classmethod
  def setUpClass(cls):
    cls.tmp = tempfile.mkdtemp(prefix='retrieval_parity_')
    cls.folder = make_fixture(cls.tmp)
    cls.model = models.VisionTransformer(
      patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32
    )
    variables = cls.model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
    cls.params = variables['params']
    utils, vits = official()
    cls.utils, cls.official_vits = utils, vits
    torch_vit = vits.VisionTransformer(
      img_size=[32],
      patch_size=8,
      embed_dim=32,
      depth=2,
      num_heads=2,
      qkv_bias=True,  # as the official vit_* builders
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
    )
    state = interop.to_pytorch(variables, cls.model)
    torch_vit.load_state_dict(
      {k: torch.tensor(v) for k, v in state.items()}, strict=True
    )
    cls.torch_vit = torch_vit.eval()
    with open(os.path.join(cls.folder, 'gnd_roxford5k.pkl'), 'rb') as f:
      cls.cfg = pickle.load(f)

  def official_features(self, names, multiscale, boxes=None):
    """eval_image_retrieval.py's path: thumbnail(ANTIALIAS), ToTensor,
    Normalize, batch 1, model (or utils.multi_scale), F.normalize."""
    rows = []
    with mock.patch.object(Image, 'ANTIALIAS', Image.LANCZOS, create=True):
      for i, name in enumerate(names):
        path = os.path.join(self.folder, 'jpg', f'{name}.jpg')
        bbx = None if boxes is None else boxes[i]
        x = torch.from_numpy(by_hand(path, bbx, resample=Image.ANTIALIAS))
        with torch.no_grad():
          if multiscale:
            rows.append(self.utils.multi_scale(x, self.torch_vit))
          else:
            rows.append(self.torch_vit(x).clone())
    return torch.nn.functional.normalize(torch.cat(rows), dim=1, p=2)

  def check(self, multiscale):
    cfg = self.cfg
    db_t = self.official_features(cfg['imlist'], multiscale)
    q_t = self.official_features(cfg['qimlist'], multiscale)
    ranks_t = torch.argsort(-torch.mm(db_t, q_t.T), dim=0).numpy()
    paths = cfg['imlist'], cfg['qimlist']
    db, q = (
      retrieval.extract(
        self.model,
        self.params,
        [os.path.join(self.folder, 'jpg', f'{n}.jpg') for n in names],
        IMSIZE,
        multiscale=multiscale,
      )
      for names in paths
    )
    np.testing.assert_allclose(db, db_t.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(q, q_t.numpy(), rtol=0, atol=1e-4)
    ranks = retrieval.rank(db, q)
    np.testing.assert_array_equal(ranks, ranks_t)
    results = retrieval.evaluate(ranks, cfg['gnd'])
    for protocol in ('medium', 'hard'):
      with in1d_shim():
        want = self.utils.compute_map(
          ranks_t, official_protocol(cfg['gnd'], protocol), [1, 5, 10]
        )
      self.assertAlmostEqual(results[protocol]['map'], 100 * want[0], 10)
      for k, p in zip((1, 5, 10), want[2], strict=True):
        self.assertAlmostEqual(results[protocol][f'mp@{k}'], 100 * p, 10)
    return results

  def test_cli_equals_official_script_on_exported_teacher(self):
    """``python -m dino_jax.eval.retrieval --official`` on a tiny workdir
    scores what the official script's path scores with the teacher
    exported by ``dino_jax.interop export``, loaded into the official ViT;
    and the same with that file as ``--pretrained``."""
    workdir = os.path.join(self.tmp, 'w')
    config = tiny_workdir(workdir)
    with contextlib.redirect_stdout(io.StringIO()):
      status, err = run_in_process(
        retrieval,
        [
          f'--workdir={workdir}',
          f'--data_root={self.tmp}',
          f'--imsize={IMSIZE}',
          '--official',
        ],
      )
    self.assertEqual(status, 0, err)
    with open(os.path.join(workdir, 'eval', 'retrieval_roxford5k.json')) as f:
      record = json.load(f)
    pth = os.path.join(self.tmp, 'teacher.pth')
    interop.export_checkpoint(workdir, pth)
    m = config.model
    torch_vit = self.official_vits.VisionTransformer(
      img_size=[m.img_size],
      patch_size=m.patch_size,
      embed_dim=m.embed_dim,
      depth=m.depth,
      num_heads=m.num_heads,
      qkv_bias=True,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
    )
    torch_vit.load_state_dict(torch.load(pth), strict=True)
    saved, self.torch_vit = self.torch_vit, torch_vit.eval()
    try:
      db = self.official_features(self.cfg['imlist'], False)
      q = self.official_features(self.cfg['qimlist'], False)
    finally:
      self.torch_vit = saved
    ranks = torch.argsort(-torch.mm(db, q.T), dim=0).numpy()
    for protocol in ('medium', 'hard'):
      with in1d_shim():
        want = self.utils.compute_map(
          ranks, official_protocol(self.cfg['gnd'], protocol), [1, 5, 10]
        )
      self.assertAlmostEqual(record[protocol]['map'], 100 * want[0], 9)
      for k, p in zip((1, 5, 10), want[2], strict=True):
        self.assertAlmostEqual(record[protocol][f'mp@{k}'], 100 * p, 9)
    # The exported file evaluated as released weights (--pretrained, with
    # the architecture's config): imported into a new workdir, the same.
    imported = os.path.join(self.tmp, 'imported')
    with contextlib.redirect_stdout(io.StringIO()):
      status, err = run_in_process(
        retrieval,
        [
          f'--workdir={imported}',
          f'--pretrained={pth}',
          f'--config={os.path.join(ROOT, "tests", "tiny_config.py")}',
          f'--data_root={self.tmp}',
          f'--imsize={IMSIZE}',
          '--official',
        ],
      )
    self.assertEqual(status, 0, err)
    path = os.path.join(imported, 'eval', 'retrieval_roxford5k.json')
    with open(path) as f:
      again = json.load(f)
    for protocol in ('medium', 'hard'):
      self.assertEqual(again[protocol], record[protocol])

  def test_single_scale(self):
    self.check(multiscale=False)

  def test_multiscale(self):
    self.check(multiscale=True)

  def test_multiscale_normalizes_each_row(self):
    # Two images of one shape in one batch: each row as alone (the official
    # multi_scale divides by the norm of the whole batch).
    paths = [os.path.join(self.folder, 'jpg', f'db_{i}.jpg') for i in (1, 2)]
    alone = retrieval.extract(
      self.model, self.params, paths, IMSIZE, multiscale=True
    )
    batch = np.stack([retrieval.load_image(p, IMSIZE) for p in paths])
    fn = retrieval.feature_fn(self.model, True)
    together = np.asarray(fn(self.params, jnp.asarray(batch)))
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1, atol=1e-6)

  def test_queries_cropped_to_their_box(self):
    names = self.cfg['qimlist']
    boxes = [g['bbx'] for g in self.cfg['gnd']]
    paths = [os.path.join(self.folder, 'jpg', f'{n}.jpg') for n in names]
    got = retrieval.extract(self.model, self.params, paths, IMSIZE, boxes=boxes)
    want = self.official_features(names, False, boxes).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    uncropped = self.official_features(names, False).numpy()
    self.assertGreater(np.abs(got - uncropped).max(), 1e-2)


if __name__ == '__main__':
  absltest.main()
