"""Attention masks (SPEC-downstream §4): ``masks`` against the official
``visualize_attention.py`` thresholding, the CLI's mask files, Jaccard.

The official code is loaded from ``$DINO_OFFICIAL_REPO`` or
``../shared/official-dino`` beside the repository (as CI lays it out).
"""

import contextlib
import functools
import importlib
import io
import json
import os
import sys
import tempfile

import jax
import numpy as np
import tiny_config
import torch
from absl import flags
from absl.testing import absltest
from PIL import Image
from test_eval_cli import run_in_process, tiny_workdir

from dino_jax import interop, models
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib
from dino_jax.cli import evals
from dino_jax.cli import flags as cli_flags
from dino_jax.data import sources
from dino_jax.evaluation import attention
from dino_jax.evaluation import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import mask_jaccard  # noqa: E402

OFFICIAL_REPO = os.environ.get(
  'DINO_OFFICIAL_REPO',
  os.path.join(os.path.dirname(ROOT), 'shared', 'official-dino'),
)
HAVE_OFFICIAL = os.path.isfile(
  os.path.join(OFFICIAL_REPO, 'visualize_attention.py')
)
# The official thresholding, visualize_attention.py's lines verbatim; the
# test checks that they are still there, then runs them (on torch, as there).
OFFICIAL_LINES = """\
val, idx = torch.sort(attentions)
val /= torch.sum(val, dim=1, keepdim=True)
cumval = torch.cumsum(val, dim=1)
th_attn = cumval > (1 - args.threshold)
idx2 = torch.argsort(idx)
for head in range(nh):
    th_attn[head] = th_attn[head][idx2[head]]
th_attn = th_attn.reshape(nh, w_featmap, h_featmap).float()
"""


_TINY = {}


def tiny():
  """(root, workdir, config): one tiny workdir for the module's CLI tests."""
  if not _TINY:
    tmp = tempfile.TemporaryDirectory()
    workdir = os.path.join(tmp.name, 'work')
    _TINY.update(tmp=tmp, workdir=workdir, config=tiny_workdir(workdir))
  return _TINY['tmp'].name, _TINY['workdir'], _TINY['config']


def tearDownModule():
  if _TINY:
    _TINY.pop('tmp').cleanup()
    _TINY.clear()


def official_masks(attn: np.ndarray, threshold: float) -> np.ndarray:
  """[heads, h, w] -> bool [heads, h, w] by the official lines."""
  nh, w_featmap, h_featmap = attn.shape
  scope = {
    'torch': torch,
    'attentions': torch.from_numpy(np.array(attn)).reshape(nh, -1),
    'args': type('Args', (), {'threshold': threshold}),
    'nh': nh,
    'w_featmap': w_featmap,
    'h_featmap': h_featmap,
  }
  exec(OFFICIAL_LINES, scope)  # noqa: S102 - the official code, quoted
  return scope['th_attn'].numpy().astype(bool)


def upsample(mask: np.ndarray, p: int) -> np.ndarray:
  """Nearest x p, as the official nn.functional.interpolate(..., 'nearest')."""
  t = torch.from_numpy(mask.astype(np.float32))[None]
  up = torch.nn.functional.interpolate(t, scale_factor=p, mode='nearest')
  return up[0].numpy().astype(bool)


def official_vit_class():
  """visualize_attention.py's model class, vision_transformer.py by path."""
  saved = sys.modules.pop('utils', None)
  sys.path.insert(0, OFFICIAL_REPO)
  try:
    module = importlib.import_module('vision_transformer')
  finally:
    sys.path.remove(OFFICIAL_REPO)
    sys.modules.pop('utils', None)
    if saved is not None:
      sys.modules['utils'] = saved
  return module.VisionTransformer


@absltest.skipUnless(HAVE_OFFICIAL, f'no official repo at {OFFICIAL_REPO}')
class OfficialThresholdTest(absltest.TestCase):
  def test_the_quoted_lines_are_the_official_ones(self):
    with open(os.path.join(OFFICIAL_REPO, 'visualize_attention.py')) as f:
      source = [line.strip() for line in f]
    for line in OFFICIAL_LINES.splitlines():
      self.assertIn(line.strip(), source)

  def test_random_attention_matches_exactly(self):
    rs = np.random.RandomState(0)
    for threshold in (0.1, 0.6, 0.9):
      for h, w in ((7, 7), (4, 6), (14, 14)):
        # float32 softmax-like maps without ties, as the model gives them.
        logits = rs.randn(6, h * w) * rs.uniform(0.1, 3)
        attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        attn = attn.reshape(6, h, w).astype(np.float32)
        self.assertEqual(np.unique(attn).size, attn.size)
        want = official_masks(attn, threshold)
        np.testing.assert_array_equal(attention.masks(attn, threshold), want)
        np.testing.assert_array_equal(
          attention.masks(attn, threshold, patch_size=8), upsample(want, 8)
        )
        np.testing.assert_array_equal(
          attention.attention_mask(attn, threshold), want
        )


class MasksTest(absltest.TestCase):
  def test_hand_computed(self):
    # Mass 0.5 + 0.25 = 0.75 < 0.8: one of the 0.125s is needed.
    attn = np.array([[[0.125, 0.25], [0.125, 0.5]]])
    np.testing.assert_array_equal(
      attention.masks(attn, 0.8), [[[True, True], [False, True]]]
    )
    # Exactly 0.75 held by the top two: the third is not needed.
    np.testing.assert_array_equal(
      attention.masks(attn, 0.75), [[[False, True], [False, True]]]
    )
    # Unnormalised maps are normalised per head; x2 upsampling row-major.
    np.testing.assert_array_equal(
      attention.masks(attn * 3, 0.5, patch_size=2)[0],
      [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]],
    )
    self.assertFalse(attention.masks(attn, 0.0).any())
    np.testing.assert_array_equal(
      attention.masks(np.array([[[0.0, 1.0], [2.0, 0.0]]]), 1.0),
      [[[False, True], [True, False]]],
    )
    with self.assertRaisesRegex(ValueError, 'threshold=1.5'):
      attention.masks(attn, 1.5)

  def test_ties_keep_the_earlier_patch(self):
    # Four equal patches, 0.6 of the mass: three are needed, and of the
    # tied ones the first three in row-major order are kept, every time.
    flat = np.full((1, 4), 0.25)
    want = [[True, True, True, False]]
    for shape in ((1, 2, 2), (1, 1, 4), (1, 4, 1)):
      got = attention.masks(flat.reshape(shape), 0.6)
      np.testing.assert_array_equal(got.reshape(1, 4), want)
    # A tie at the boundary, among other values: 0.4, then 0.2 at 2 and 3.
    attn = np.array([[[0.1, 0.2], [0.4, 0.2], [0.05, 0.05]]])
    np.testing.assert_array_equal(
      attention.masks(attn, 0.7),  # 0.4 + 0.2 < 0.7: one more 0.2
      [[[False, True], [True, True], [False, False]]],
    )
    np.testing.assert_array_equal(
      attention.masks(attn, 0.5),  # 0.4 < 0.5: the first 0.2 (index 1)
      [[[False, True], [True, False], [False, False]]],
    )
    # Per head along leading axes: a batch of heads is each head alone.
    batch = np.stack([attn[0], attn[0][::-1]])[None]
    got = attention.masks(batch, 0.5)
    np.testing.assert_array_equal(got[0, 0], attention.masks(attn, 0.5)[0])
    np.testing.assert_array_equal(
      got[0, 1], attention.masks(attn[:, ::-1], 0.5)[0]
    )


class JaccardTest(absltest.TestCase):
  def test_hand_made_masks(self):
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 pixels
    b[1:3, 1:3] = True  # 4 pixels, 1 shared
    self.assertAlmostEqual(attention.jaccard(a, b), 1 / 7)
    self.assertEqual(attention.jaccard(a, a), 1.0)
    self.assertEqual(attention.jaccard(a, ~a), 0.0)
    self.assertEqual(attention.jaccard(a, np.zeros_like(a)), 0.0)
    self.assertEqual(attention.jaccard(b & False, a & False), 1.0)
    b[:] = True
    self.assertAlmostEqual(attention.jaccard(a, b), 4 / 16)
    with self.assertRaisesRegex(ValueError, r'\(4, 4\).*\(2, 2\)'):
      attention.jaccard(a, a[:2, :2])

  def test_best_head_mean(self):
    # Two images, two heads: per image the best head's Jaccard, averaged.
    sil = np.zeros((2, 4, 4), bool)
    sil[0, :2] = True  # the top half
    sil[1, :, :2] = True  # the left half
    grid = np.zeros((2, 2, 2, 2))
    grid[0, 0] = [[1, 1], [0, 0]]  # image 0, head 0: the top half: 1.0
    grid[0, 1] = [[1, 0], [0, 0]]  # head 1: one quarter: 0.5
    grid[1, 0] = [[1, 0], [0, 0]]  # image 1, head 0: 0.5
    grid[1, 1] = [[0, 1], [0, 1]]  # head 1: the right half: 0.0
    m = attention.masks(grid + 1e-9, 0.99, patch_size=2)
    self.assertAlmostEqual(attention.best_head_jaccard(m, sil), 0.75)


class MaskJaccardEvalTest(absltest.TestCase):
  def test_batched_and_cropped_equals_the_per_image_loop(self):
    model = models.VisionTransformer(
      patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32
    )
    params = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3)))['params']
    rs = np.random.RandomState(3)
    images = rs.randn(3, 36, 36, 3).astype(np.float32)  # cropped to 32
    sil = rs.rand(3, 36, 36) > 0.5
    config = tiny_config.get_config()
    config.eval.batch_size = 2  # batches of 2 and 1
    config.eval.attention_threshold = 0.6
    got = attention.mask_jaccard_eval(config, None, model, params, images, sil)
    want = []
    for image, s in zip(images, sil, strict=True):
      attn = attention.cls_attention(model, params, image, 8)  # [2, 4, 4]
      best = 0.0
      for head in attn:
        m = upsample(official_masks(head[None], 0.6), 8)[0]
        s32 = s[:32, :32]
        best = max(best, (m & s32).sum() / (m | s32).sum())
      want.append(best)
    self.assertAlmostEqual(got, np.mean(want), places=12)
    self.assertGreater(got, 0.0)
    with self.assertRaisesRegex(ValueError, 'do not match'):
      attention.mask_jaccard_eval(config, None, model, params, images, sil[:2])


class CliTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root, cls.workdir, cls.config = tiny()
    cls.image = os.path.join(cls.root, 'pic.png')
    pixels = np.random.RandomState(5).randint(0, 256, (40, 40, 3), np.uint8)
    Image.fromarray(pixels).save(cls.image)

  def test_mask_files_equal_masks_and_the_official_pipeline(self):
    out = os.path.join(self.root, 'out')
    argv = [
      f'--workdir={self.workdir}',
      f'--image={self.image}',
      '--image_size=32',
      '--threshold=0.6',
      f'--output_dir={out}',
    ]
    status, stderr = run_in_process(attention, argv)
    self.assertEqual(status, 0, stderr)
    heads, p = self.config.model.num_heads, self.config.model.patch_size
    files = [os.path.join(out, f'pic-binmask{i}.png') for i in range(heads)]
    got = np.stack([np.asarray(Image.open(f)) for f in files])
    self.assertEqual(got.shape, (heads, 32, 32))
    self.assertTrue(set(np.unique(got)) <= {0, 255})
    # masks() of the teacher's attention, recomputed here.
    config, mesh, state, _ = workdir_lib.load_workdir(self.workdir, [])
    _, teacher = step_lib.build_models(config)
    params = state.teacher['backbone']
    image = attention.load_image(self.image, 32, p)
    attn = attention.cls_attention(teacher.backbone, params, image, p, mesh)
    np.testing.assert_array_equal(got, attention.masks(attn, 0.6, p) * 255)
    if not HAVE_OFFICIAL:
      return
    # The official model (our weights) and the official thresholding.
    vit = official_vit_class()(
      img_size=[32],
      patch_size=p,
      embed_dim=32,
      depth=2,
      num_heads=heads,
      mlp_ratio=4,
      qkv_bias=True,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
    ).eval()
    params = {'params': jax_to_numpy(params)}
    state_dict = interop.to_pytorch(params, teacher.backbone)
    vit.load_state_dict({k: torch.tensor(v) for k, v in state_dict.items()})
    with torch.no_grad():
      x = torch.from_numpy(image.transpose(2, 0, 1)[None].copy())
      official = vit.get_last_selfattention(x)[0, :, 0, 1:]
    official = official.reshape(heads, 32 // p, 32 // p).numpy()
    np.testing.assert_allclose(official, attn, atol=1e-5)
    want = upsample(official_masks(official, 0.6), p)
    np.testing.assert_array_equal(got, want * 255)

  def test_bad_threshold_is_one_error_and_writes_nothing(self):
    out = os.path.join(self.root, 'bad')
    argv = [
      f'--workdir={self.workdir}',
      f'--image={self.image}',
      '--threshold=1.5',
      f'--output_dir={out}',
    ]
    status, stderr = run_in_process(attention, argv)
    self.assertEqual(status, 1, stderr)
    lines = [x for x in stderr.splitlines() if x.startswith('error:')]
    self.assertLen(lines, 1, stderr)
    self.assertIn('--threshold=1.5', lines[0])
    self.assertNotIn('Traceback', stderr)
    self.assertFalse(os.path.exists(out))


class AttentionCliInputTest(absltest.TestCase):
  def test_not_an_image_is_one_error_naming_it(self):
    root, workdir, _ = tiny()
    notes = os.path.join(root, 'notes.txt')
    with open(notes, 'w') as f:
      f.write('not an image')
    out = os.path.join(root, 'notes_out')
    argv = [f'--workdir={workdir}', f'--image={notes}', f'--output_dir={out}']
    status, stderr = run_in_process(attention, argv)
    self.assertEqual(status, 1, stderr)
    lines = [x for x in stderr.splitlines() if x.startswith('error:')]
    self.assertLen(lines, 1, stderr)
    self.assertIn(f'--image={notes}', lines[0])
    self.assertNotIn('Traceback', stderr)
    self.assertFalse(os.path.exists(out))

  def test_pretrained_flag_is_taken(self):
    values = flags.FlagValues()
    evals.define_attention(values)
    self.assertIn('pretrained', values)
    self.assertIn('config', values)


def write_idx(path: str, array: np.ndarray) -> None:
  """A uint8 IDX file (the Fashion-MNIST format)."""
  header = bytes([0, 0, 8, array.ndim])
  dims = b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
  with open(path, 'wb') as f:
    f.write(header + dims + array.astype(np.uint8).tobytes())


class MaskJaccardScriptTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root, cls.workdir, cls.config = tiny()
    cls.data = os.path.join(cls.root, 'fmnist')
    os.mkdir(cls.data)
    rs = np.random.RandomState(4)
    images = np.zeros((6, 28, 28), np.uint8)
    for i, image in enumerate(images):  # a bright box on black
      top, left = rs.randint(0, 12, 2)
      image[top : top + 10 + i, left : left + 12] = rs.randint(1, 256)
    write_idx(os.path.join(cls.data, 't10k-images-idx3-ubyte'), images)
    write_idx(os.path.join(cls.data, 't10k-labels-idx1-ubyte'), np.arange(6))
    cls.images = images

  def setUp(self):
    super().setUp()
    self.record = os.path.join(self.workdir, 'eval', 'mask_jaccard.json')
    if os.path.exists(self.record):
      os.remove(self.record)

  def run_script(self, *argv):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
      status = cli_flags.run_cli(
        mask_jaccard.define_flags,
        mask_jaccard.main,
        ['prog', f'--workdir={self.workdir}', *argv],
        errors=(sources.DataError,),
      )
    return status, stdout.getvalue(), stderr.getvalue()

  def test_prints_and_records_both_scores(self):
    status, out, err = self.run_script(f'--data_path={self.data}', '--n=4')
    self.assertEqual(status, 0, err)
    config, mesh, state, step = workdir_lib.load_workdir(self.workdir, [])
    _, teacher = step_lib.build_models(config)
    images, sil = mask_jaccard.load_images(self.data, 4)
    np.testing.assert_array_equal(sil, self.images[:4] > 0)
    self.assertEqual(images.shape, (4, 28, 28, 3))
    want = {
      name: attention.mask_jaccard_eval(
        config, mesh, teacher.backbone, p, images, sil
      )
      for name, p in (
        ('dino', state.teacher['backbone']),
        ('random_init', run_lib._random_init(config, mesh, teacher.backbone)),
      )
    }
    self.assertNotEqual(want['dino'], want['random_init'])
    crop = sil[:, :24, :24]  # p = 8
    want['whole_image'] = np.mean(crop.sum((1, 2)) / crop[0].size)
    for name, score in want.items():
      self.assertIn(f'{name}: best-head Jaccard {100 * score:.1f} ', out)
    with open(self.record) as f:
      record = json.load(f)
    self.assertEqual(
      record,
      {'step': step, 'images': 4, 'threshold': 0.6, **want},
    )

  def test_bad_input_is_one_error_and_writes_nothing(self):
    cases = [
      (['--n=0'], '--n=0'),
      ([f'--data_path={self.root}/none'], f'{self.root}/none'),
      (
        [f'--data_path={self.data}', '--config.eval.attention_threshold=2.0'],
        'eval.attention_threshold=2.0',
      ),
    ]
    for argv, value in cases:
      status, _, err = self.run_script(*argv)
      self.assertEqual(status, 1, err)
      lines = [x for x in err.splitlines() if x.startswith('error:')]
      self.assertLen(lines, 1, err)
      self.assertIn(value, lines[0])
      self.assertFalse(os.path.exists(self.record))


def jax_to_numpy(tree):
  return {
    k: jax_to_numpy(v) if isinstance(v, dict) else np.asarray(v)
    for k, v in tree.items()
  }


if __name__ == '__main__':
  absltest.main()
