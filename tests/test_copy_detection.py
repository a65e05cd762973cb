"""Copy detection on Copydays (dino_jax.evaluation.copy_detection).

Side by side with the official code (``eval_copy_detection.py``,
``utils.PCA``, ``vision_transformer``), loaded by path from
``$DINO_OFFICIAL_REPO`` or ``../shared/official-dino`` beside the repository.
"""

import contextlib
import functools
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from unittest import mock

import numpy as np
import torch
from absl.testing import absltest
from PIL import Image
from test_cli import env
from test_eval_cli import tiny_workdir

from dino_jax import interop
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib
from dino_jax.cli import evals
from dino_jax.data import multicrop
from dino_jax.evaluation import copy_detection as cd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import convergence  # noqa: E402

OFFICIAL_REPO = os.environ.get(
  'DINO_OFFICIAL_REPO',
  os.path.join(os.path.dirname(ROOT), 'shared', 'official-dino'),
)
HAVE_OFFICIAL = os.path.isfile(
  os.path.join(OFFICIAL_REPO, 'eval_copy_detection.py')
)
OFFICIAL = None


def setUpModule():
  global OFFICIAL
  if not HAVE_OFFICIAL:
    return
  # NumPy 2.4 lacks np.in1d and Pillow 10+ Image.ANTIALIAS: the official
  # modules may reach them; shimmed here only, never in the product.
  if not hasattr(np, 'in1d'):
    np.in1d = np.isin
  if not hasattr(Image, 'ANTIALIAS'):
    Image.ANTIALIAS = Image.LANCZOS
  base = convergence.load_official(OFFICIAL_REPO)  # stubs torchvision
  import importlib.util

  datasets = sys.modules['torchvision'].datasets
  if not hasattr(datasets, 'ImageFolder'):  # the stub: eval_knn subclasses it
    datasets.ImageFolder = type('ImageFolder', (), {})

  path = os.path.join(os.path.abspath(OFFICIAL_REPO), 'eval_copy_detection.py')
  spec = importlib.util.spec_from_file_location('eval_copy_detection', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  # torchvision does not import beside torch 2.13 CPU: the three transforms
  # the official extract_features uses, with torchvision's semantics.
  module.pth_transforms = types.SimpleNamespace(
    Compose=_Compose, Resize=_Resize, ToTensor=_ToTensor, Normalize=_Normalize
  )
  OFFICIAL = types.SimpleNamespace(
    utils=base.utils, vits=base.vits, copy=module
  )


class _Compose:
  def __init__(self, fns):
    self.fns = fns

  def __call__(self, x):
    for f in self.fns:
      x = f(x)
    return x


class _Resize:
  def __init__(self, size, interpolation):
    assert interpolation == 3  # PIL.Image.BICUBIC
    self.h, self.w = size

  def __call__(self, image):
    return image.resize((self.w, self.h), Image.BICUBIC)


class _ToTensor:
  def __call__(self, image):
    x = np.asarray(image, np.float32) / 255.0
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


class _Normalize:
  def __init__(self, mean, std):
    self.mean = torch.tensor(mean).view(3, 1, 1)
    self.std = torch.tensor(std).view(3, 1, 1)

  def __call__(self, x):
    return (x - self.mean) / self.std


def needs_official(cls):
  return absltest.skipUnless(
    HAVE_OFFICIAL, f'no official code at {OFFICIAL_REPO}'
  )(cls)


def _image(path, seed, size):
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size[1], size[0], 3), np.uint8)
  Image.fromarray(pixels).save(path, quality=90)


def make_copydays(root):
  """A tiny Copydays: 3 originals, 2 strong, jpegqual/50 and crops/50."""
  originals = ['200000.jpg', '200100.jpg', '200200.jpg']
  for block in ('original', 'strong', 'jpegqual/50', 'crops/50'):
    os.makedirs(os.path.join(root, block))
  for i, name in enumerate(originals):
    base = os.path.join(root, 'original', name)
    _image(base, i, (40, 32))
    image = Image.open(base)
    image.save(os.path.join(root, 'jpegqual/50', name), quality=20)
    image.crop((4, 4, 36, 28)).save(os.path.join(root, 'crops/50', name))
  # strong copies of 2000xx (prefix '2000') and 2002xx, named as Copydays.
  image = Image.open(os.path.join(root, 'original', originals[0]))
  image.rotate(20).save(os.path.join(root, 'strong', '200001.jpg'))
  image = Image.open(os.path.join(root, 'original', originals[2]))
  image.transpose(Image.FLIP_LEFT_RIGHT).save(
    os.path.join(root, 'strong', '200201.jpg')
  )
  return root


def make_folder(root, count, seed, size=(48, 36)):
  os.makedirs(root)
  for i in range(count):
    _image(os.path.join(root, f'img{i:03d}.jpg'), seed + i, size)
  return root


class ScoringTest(absltest.TestCase):
  def test_average_precision_by_hand(self):
    # positives at ranks 0 and 2 of 2: (1+1)/4 + (1/2+2/3)/4
    self.assertAlmostEqual(
      cd.average_precision([0, 2], 2), 0.5 + (0.5 + 2 / 3) / 4, places=12
    )
    self.assertEqual(cd.average_precision([], 3), 0.0)
    self.assertEqual(cd.average_precision([], 0), 0.0)

  def test_positives(self):
    originals = ['200000.jpg', '200100.jpg', '200200.jpg', '200201.jpg']
    self.assertEqual(
      cd.block_positives('strong', ['200001.jpg', '200250.jpg'], originals),
      [[0], [2, 3]],
    )
    self.assertEqual(
      cd.block_positives('crops/50', originals, originals),
      [[0], [1], [2], [3]],
    )
    with self.assertRaisesRegex(cd.CopydaysError, 'crops/10 holds 2'):
      cd.block_positives('crops/10', originals[:2], originals)

  def test_query_blocks_numeric_order(self):
    with tempfile.TemporaryDirectory() as tmp:
      for block in ('original', 'strong', 'jpegqual/5', 'jpegqual/10',
                    'crops/80', 'crops/15', 'crops/empty'):  # fmt: skip
        os.makedirs(os.path.join(tmp, block))
        if block != 'crops/empty':
          _image(os.path.join(tmp, block, 'a.jpg'), 0, (8, 8))
      self.assertEqual(
        cd.query_blocks(tmp),
        ['strong', 'jpegqual/5', 'jpegqual/10', 'crops/15', 'crops/80'],
      )

  def test_centred_whitening_by_hand(self):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)) @ rng.normal(size=(4, 4)) + 3.0
    mean, projection = cd.learn_whitening(x)
    y = (x - mean) @ projection.T
    np.testing.assert_allclose(y.T @ y / len(x), np.eye(4), atol=1e-10)
    np.testing.assert_allclose(
      np.linalg.norm(cd.whiten(x, mean, projection), axis=1), 1.0, atol=1e-12
    )


@needs_official
class OfficialScoringTest(absltest.TestCase):
  def test_ap_equals_official(self):
    rng = np.random.default_rng(1)
    for _ in range(200):
      n = int(rng.integers(1, 6))
      ranks = sorted(
        rng.choice(20, size=int(rng.integers(0, n + 1)), replace=False)
      )
      ours = cd.average_precision([int(r) for r in ranks], n)
      theirs = OFFICIAL.copy.score_ap_from_ranks_1(list(ranks), n)
      self.assertAlmostEqual(ours, theirs, delta=1e-12)

  def test_pca_equals_official(self):
    rng = np.random.default_rng(2)
    for n, dim in ((40, 6), (5, 8)):  # (5, 8): clamped eigenvalues
      x = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + 0.5
      q = rng.normal(size=(7, dim))
      mean, projection = cd.learn_whitening(x, official=True)
      pca = OFFICIAL.utils.PCA(dim=dim, whit=0.5)
      with contextlib.redirect_stdout(io.StringIO()):
        pca.train_pca(x.T @ x / n)  # the official's uncentred covariance
      theirs = pca.apply(q - x.mean(0))
      ours = (q - mean) @ projection.T
      # eigenvectors are defined up to sign (and rotation inside a clamped,
      # isotropic subspace): compare the whitened inner products.
      np.testing.assert_allclose(ours @ ours.T, theirs @ theirs.T, atol=1e-6)
      if n > dim:  # distinct eigenvalues: the same vectors up to sign
        np.testing.assert_allclose(
          cd.whiten(q, mean, projection),
          cd.l2_normalize(theirs) * np.sign(np.sum(ours * theirs, 0)),
          atol=1e-6,
        )


def _official_block_maps(blocks, sizes, retrieved, data_root):
  """The official eval_result's printed mAP per block (3 decimals)."""
  ds = OFFICIAL.copy.CopydaysDataset(data_root)
  ds.block_names = list(blocks)
  ds.nblocks = len(blocks)
  ds.q_block_sizes = np.array(sizes)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ds.eval_result(retrieved, None)
  return {
    m[0]: float(m[1])
    for m in re.findall(r'eval on (\S+) mAP=([0-9.]+)', out.getvalue())
  }


def _reference_features(model, params, paths, imsize):
  """CLS + GeM by hand: PIL bicubic, numpy normalization, numpy GeM."""
  images = []
  for p in paths:
    image = Image.open(p).convert('RGB').resize((imsize, imsize), 3)
    x = np.asarray(image, np.float64) / 255.0
    images.append((x - multicrop.MEAN) / np.array(multicrop.STD))
  tokens = np.asarray(
    model.apply(
      {'params': params},
      np.stack(images).astype(np.float32),
      method='features',
    ),
    np.float64,
  )
  gem = np.mean(np.maximum(tokens[:, 1:], 1e-6) ** 4, axis=1) ** 0.25
  return np.concatenate([tokens[:, 0], gem], axis=1)


def _reference_map(queries, database, positives):
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  d = database / np.linalg.norm(database, axis=1, keepdims=True)
  top = np.argsort(-(q @ d.T), axis=1)[:, :20]
  aps = []
  for row, pos in zip(top, positives, strict=True):
    ranks = [r for r, j in enumerate(row) if j in pos]
    # hand-computed Holidays trapezoid
    ap = sum(
      ((1.0 if r == 0 else t / r) + (t + 1) / (r + 1)) / (2 * len(pos))
      for t, r in enumerate(ranks)
    )
    aps.append(ap)
  return float(np.mean(aps)), top


_SHARED = {}


def _shared_fixture() -> dict:
  """Built once per module (the workdir takes seconds), removed at the end."""
  if not _SHARED:
    tmp = tempfile.TemporaryDirectory()
    root = tmp.name
    workdir = os.path.join(root, 'work')
    tiny_workdir(workdir)
    config, _, state, _ = workdir_lib.load_workdir(workdir, [])
    _, teacher = step_lib.build_models(config)
    _SHARED.update(
      cleanup=tmp,
      tmp=root,
      data=make_copydays(os.path.join(root, 'copydays')),
      distractors=make_folder(os.path.join(root, 'distract'), 3, 10),
      whitening=make_folder(os.path.join(root, 'whit'), 4, 20),
      workdir=workdir,
      config=config,
      model=teacher.backbone,
      params=state.teacher['backbone'],
    )
  return _SHARED


def tearDownModule():
  if _SHARED:
    _SHARED.pop('cleanup').cleanup()
    _SHARED.clear()


class _Fixture:
  """A tiny Copydays tree, distractors, a whitening set, a tiny workdir."""

  @classmethod
  def setUpClass(cls):
    for key, value in _shared_fixture().items():
      if key != 'cleanup':
        setattr(cls, key, value)

  def run_cli(self, *argv):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
      stderr = io.StringIO()
      with contextlib.redirect_stderr(stderr):
        status = evals.run(  # as python -m dino_jax.eval.copy_detection
          'copy_detection', ['prog', f'--workdir={self.workdir}', *argv]
        )
      stderr = stderr.getvalue()
    return status, stderr, stdout.getvalue()

  def record(self):
    path = os.path.join(self.workdir, 'eval', 'copy_detection.json')
    with open(path) as f:
      return json.load(f)

  def blocks(self):
    names = ['strong', 'jpegqual/50', 'crops/50']
    originals = cd.list_images(os.path.join(self.data, 'original'))
    onames = [os.path.basename(p) for p in originals]
    out = {}
    for b in names:
      paths = cd.list_images(os.path.join(self.data, b))
      out[b] = (paths, cd.block_positives(
        b, [os.path.basename(p) for p in paths], onames))  # fmt: skip
    self.assertEqual(
      [p for p, _ in out.values()][0][0].rsplit('/', 1)[1], '200001.jpg'
    )
    return originals, out


def _project(x, mean, vecs, vals):
  return (x - mean) @ vecs / np.sqrt(vals)


class CliTest(_Fixture, absltest.TestCase):
  def test_map_equals_recomputation(self):
    status, stderr, stdout = self.run_cli(
      f'--data_root={self.data}',
      f'--distractors={self.distractors}',
      '--imsize=32',
    )
    self.assertEqual(status, 0, stderr)
    self.assertIn('crops/50', stdout)
    record = self.record()
    originals, blocks = self.blocks()
    self.assertEqual(list(record['blocks']), list(blocks))
    self.assertEqual(record['distractors'], 3)
    feats = functools.partial(
      _reference_features, self.model, self.params, imsize=32
    )
    database = np.concatenate(
      [feats(originals), feats(cd.list_images(self.distractors))]
    )
    self.assertEqual(database.shape, (6, 64))
    for b, (paths, pos) in blocks.items():
      expected, _ = _reference_map(feats(paths), database, pos)
      self.assertAlmostEqual(record['blocks'][b]['mAP'], expected, delta=1e-6)
      self.assertEqual(record['blocks'][b]['queries'], len(paths))
    # the jpeg and crop copies of random images find their originals
    self.assertGreater(record['blocks']['jpegqual/50']['mAP'], 0.9)

  def test_whitening_equals_recomputation(self):
    for official in (False, True):
      # the mAP hardly depends on the covariance here: check it is asked for
      spy = mock.patch.object(cd, 'learn_whitening', wraps=cd.learn_whitening)
      with spy as learn:
        status, stderr, _ = self.run_cli(
          f'--data_root={self.data}',
          f'--whitening={self.whitening}',
          '--imsize=32',
          '--official' if official else '--noofficial',
        )
      self.assertEqual(status, 0, stderr)
      learn.assert_called_once()
      self.assertEqual(learn.call_args.kwargs, {'official': official})
      self.assertEqual(learn.call_args.args[0].shape, (4, 64))
      record = self.record()
      self.assertEqual(record['official'], official)
      originals, blocks = self.blocks()
      feats = functools.partial(
        _reference_features, self.model, self.params, imsize=32
      )
      w = feats(cd.list_images(self.whitening))
      mean = w.mean(0)
      c = w if official else w - mean
      vals, vecs = np.linalg.eigh(c.T @ c / len(w))
      vals = np.maximum(vals, vals.max() * 1e-5)
      project = functools.partial(_project, mean=mean, vecs=vecs, vals=vals)
      database = project(feats(originals))
      for b, (paths, pos) in blocks.items():
        expected, _ = _reference_map(project(feats(paths)), database, pos)
        self.assertAlmostEqual(record['blocks'][b]['mAP'], expected, delta=1e-6)

  def test_bad_input_one_error_nothing_written(self):
    missing = os.path.join(self.tmp, 'nope')
    broken = os.path.join(self.tmp, 'broken')
    os.makedirs(broken, exist_ok=True)
    with open(os.path.join(broken, 'bad.jpg'), 'wb') as f:
      f.write(b'not a jpeg')
    cases = [
      ([f'--data_root={missing}'], f'--data_root={missing} is not a dir'),
      ([f'--data_root={self.data}', f'--whitening={missing}'], '--whitening'),
      ([f'--data_root={self.data}', f'--distractors={missing}'], 'distract'),
      ([f'--data_root={self.tmp}'], 'no original/'),
      ([f'--data_root={self.data}', '--imsize=0'], '--imsize=0 must be'),
      (
        [f'--data_root={self.data}', f'--distractors={broken}'],
        f'cannot read image {broken}/bad.jpg',
      ),
    ]
    record = os.path.join(self.workdir, 'eval', 'copy_detection.json')
    for argv, message in cases:
      if os.path.exists(record):
        os.remove(record)
      status, stderr, _ = self.run_cli(*argv)
      errors = [x for x in stderr.splitlines() if x.startswith('error:')]
      self.assertEqual(status, 1, stderr)
      self.assertLen(errors, 1, stderr)
      self.assertIn(message, errors[0])
      self.assertFalse(os.path.exists(record))

  def test_module_cli_reports_one_error_line(self):
    missing = os.path.join(self.tmp, 'nope')
    result = subprocess.run(
      [
        sys.executable,
        '-m',
        'dino_jax.eval.copy_detection',
        f'--workdir={self.workdir}',
        f'--data_root={missing}',
      ],  # fmt: skip
      env=env(),
      capture_output=True,
      text=True,
      timeout=120,
      cwd=ROOT,
    )
    self.assertEqual(result.returncode, 1, result.stderr)
    self.assertEqual(
      result.stderr.strip().splitlines(),
      [
        f'error: --data_root={missing} is not a directory; pass an existing '
        'folder'
      ],  # fmt: skip
    )


@needs_official
class ParityTest(_Fixture, absltest.TestCase):
  """The same random-init tiny ViT in the official code (exported from the
  workdir) and in dino_jax."""

  def official_model(self):
    m = self.config.model
    model = OFFICIAL.vits.VisionTransformer(
      img_size=[m.img_size],
      patch_size=m.patch_size,
      embed_dim=m.embed_dim,
      depth=m.depth,
      num_heads=m.num_heads,
      mlp_ratio=4,
      qkv_bias=True,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
    )
    # The workdir's teacher as `python -m dino_jax.interop export` writes it.
    pth = os.path.join(self.tmp, 'teacher.pth')
    interop.export_checkpoint(self.workdir, pth)
    model.load_state_dict(torch.load(pth), strict=True)
    return model.eval()

  def official_features(self, model, paths, imsize):
    args = types.SimpleNamespace(
      imsize=imsize, batch_size_per_gpu=2, num_workers=0, use_cuda=False
    )
    cuda = torch.Tensor.cuda
    out = io.StringIO()
    with (
      convergence.single_process_group(),
      mock.patch.object(torch.Tensor, 'cuda', lambda x, **_: x),
      contextlib.redirect_stdout(out),
    ):
      feats = OFFICIAL.copy.extract_features(paths, model, args)
    self.assertIs(torch.Tensor.cuda, cuda)
    return feats.numpy().astype(np.float64)

  def test_features_and_map_equal_official(self):
    model = self.official_model()
    originals, blocks = self.blocks()
    for imsize in (32, 48):
      theirs = self.official_features(model, originals, imsize)
      ours = cd.extract(originals, self.model, self.params, None, imsize=imsize)
      np.testing.assert_allclose(ours, theirs, atol=1e-4)
    status, stderr, _ = self.run_cli(
      f'--data_root={self.data}',
      f'--whitening={self.whitening}',
      '--imsize=32',
      '--official',
    )
    self.assertEqual(status, 0, stderr)
    record = self.record()
    # the official pipeline: features, centring, uncentred PCA, L2, top 20
    w = self.official_features(model, cd.list_images(self.whitening), 32)
    pca = OFFICIAL.utils.PCA(dim=w.shape[1], whit=0.5)
    with contextlib.redirect_stdout(io.StringIO()):
      pca.train_pca(w.T @ w / len(w))
    prep = lambda x: cd.l2_normalize(pca.apply(x - w.mean(0)))  # noqa: E731
    database = prep(self.official_features(model, originals, 32))
    queries = [
      prep(self.official_features(model, p, 32)) for p, _ in blocks.values()
    ]
    retrieved = np.argsort(-(np.concatenate(queries) @ database.T), 1)[:, :20]
    official = _official_block_maps(
      list(blocks), [len(q) for q in queries], retrieved, self.data
    )
    self.assertLen(official, 3)
    start = 0
    for (b, m), (_, pos) in zip(official.items(), blocks.values(), strict=True):
      # the official prints 3 decimals; its AP function, unrounded:
      rows = retrieved[start : start + len(pos)]
      start += len(pos)
      aps = [
        OFFICIAL.copy.score_ap_from_ranks_1(
          [r for r, j in enumerate(row) if j in p], len(p)
        )
        for row, p in zip(rows, pos, strict=True)
      ]
      self.assertAlmostEqual(record['blocks'][b]['mAP'], m, delta=5e-4)
      self.assertAlmostEqual(m, np.mean(aps), delta=5e-4)
      self.assertAlmostEqual(record['blocks'][b]['mAP'], np.mean(aps), 12)


if __name__ == '__main__':
  absltest.main()
