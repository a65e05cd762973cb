"""DAVIS label propagation (dino_jax.evaluation.video) and its metrics.

The propagation is compared with the official eval_video_segmentation.py,
loaded from ``$DINO_OFFICIAL_REPO`` or ``../shared/official-dino`` beside
the repository (as tests/test_convergence.py does).
"""

import argparse
import contextlib
import functools
import importlib.util
import io
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl.testing import absltest
from PIL import Image
from test_eval_cli import error_lines, run_in_process, tiny_workdir

from dino_jax import interop, models
from dino_jax.evaluation import davis_metrics, video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import convergence  # noqa: E402

OFFICIAL_REPO = os.environ.get(
  'DINO_OFFICIAL_REPO',
  os.path.join(os.path.dirname(ROOT), 'shared', 'official-dino'),
)
HAVE_OFFICIAL = os.path.isfile(
  os.path.join(OFFICIAL_REPO, 'eval_video_segmentation.py')
)


def load_official_video():
  """eval_video_segmentation.py by path; cv2 stubbed when absent (only
  read_frame uses it), .cuda() a no-op."""
  convergence._stub_torchvision()
  try:
    import cv2  # noqa: F401
  except ImportError:
    sys.modules['cv2'] = types.ModuleType('cv2')
  if OFFICIAL_REPO not in sys.path:
    sys.path.insert(0, OFFICIAL_REPO)
  path = os.path.join(OFFICIAL_REPO, 'eval_video_segmentation.py')
  spec = importlib.util.spec_from_file_location('official_video', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class FakeModel:
  """get_intermediate_layers returning fixed patch tokens (CLS first)."""

  def __init__(self, tokens, patch):
    self.tokens = tokens  # [N, D]
    self.patch_embed = types.SimpleNamespace(patch_size=patch)

  def get_intermediate_layers(self, x, n=1):
    cls = torch.zeros(1, self.tokens.shape[1])
    return [torch.cat([cls, self.tokens])[None]]


@absltest.skipUnless(HAVE_OFFICIAL, f'no official code at {OFFICIAL_REPO}')
class OfficialParityTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    cls.official = load_official_video()
    cls._cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self

  @classmethod
  def tearDownClass(cls):
    torch.Tensor.cuda = cls._cuda

  def args(self, size, topk):
    args = argparse.Namespace(size_mask_neighborhood=size, topk=topk)
    self.official.args = args  # restrict_neighborhood reads the global
    return args

  def test_neighborhood_mask(self):
    for h, w, size in [(5, 7, 2), (4, 4, 1), (3, 6, 12)]:
      self.args(size, 5)
      want = self.official.restrict_neighborhood(h, w).numpy()
      got = np.asarray(video.neighborhood_mask(h, w, size))
      np.testing.assert_array_equal(got, want)

  def test_propagation_matches_official(self):
    rng = np.random.default_rng(0)
    h, w, d, c, patch = 5, 6, 16, 3, 8
    n = h * w
    # (1, 1, 12): fewer sources in the window than topk at every patch.
    cases = [(1, 2, 5), (4, 2, 5), (8, 1, 3), (3, 0, 5), (1, 1, 12)]
    for k, size, topk in cases:
      feats = rng.normal(size=(k, n, d)).astype(np.float32)
      target = rng.normal(size=(n, d)).astype(np.float32)
      segs = rng.random((k, n, c)).astype(np.float32)
      segs[0] = np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]
      args = self.args(size, topk)
      model = FakeModel(torch.from_numpy(target), patch)
      frame = torch.zeros(3, h * patch, w * patch)
      list_feats = [torch.from_numpy(f).T for f in feats]
      list_segs = [
        torch.from_numpy(s.T.reshape(1, c, h, w).copy()) for s in segs
      ]
      want, feat_back, _ = self.official.label_propagation(
        args, model, frame, list_feats, list_segs
      )
      want = want[0].reshape(c, n).T.numpy()
      mask = video.neighborhood_mask(h, w, size) if size > 0 else None
      got = video.propagate(
        jnp.asarray(target), jnp.asarray(feats), jnp.asarray(segs), mask, topk
      )
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(feat_back.T.numpy(), target)

  def test_features_match_official_extract_feature(self):
    model = models.VisionTransformer(
      patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32
    )
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    torch_vit = self.official.vits.VisionTransformer(
      patch_size=8,
      embed_dim=32,
      depth=2,
      num_heads=2,
      img_size=[32],
      qkv_bias=True,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
    ).eval()
    exported = interop.to_pytorch(variables, model)
    torch_vit.load_state_dict(
      {k: torch.from_numpy(np.array(v)) for k, v in exported.items()}
    )
    # A 40 x 56 frame: a 5 x 7 grid, positions interpolated.
    image = np.random.default_rng(2).normal(size=(40, 56, 3))
    image = image.astype(np.float32)
    with torch.no_grad():
      want, h, w = self.official.extract_feature(
        torch_vit,
        torch.from_numpy(image.transpose(2, 0, 1).copy()),
        return_h_w=True,
      )
    self.assertEqual((h, w), (5, 7))
    got = video.make_feature_fn(model, variables['params'])(image)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)

  def test_upsampled_labels_match_official(self):
    rng = np.random.default_rng(1)
    h, w, c, p = 4, 5, 3, 8
    seg = rng.random((h, w, c)).astype(np.float32)
    seg[..., 2] *= 0.3
    x = torch.from_numpy(seg.transpose(2, 0, 1).copy())[None]
    up = torch.nn.functional.interpolate(
      x, scale_factor=p, mode='bilinear', align_corners=False
    )[0]
    want = torch.max(self.official.norm_mask(up), dim=0)[1].numpy()
    got = np.asarray(video.upsample_labels(jnp.asarray(seg), p))
    np.testing.assert_array_equal(got, want)

  def test_video_segmented_as_the_official_script(self):
    """The tiny workdir's teacher, exported (``dino_jax.interop export``)
    and loaded into the official ViT, segments the synthetic video through
    the official eval_video_tracking_davis: the same PNGs, hence the same
    J and F, as ``python -m dino_jax.eval.video --official``. cv2 is not
    installed: its imread is PIL's decode in BGR order, and at --size=64
    no frame is resized (the stub refuses to)."""
    tmp = self.create_tempdir().full_path
    workdir = os.path.join(tmp, 'w')
    config = tiny_workdir(workdir)
    davis = synthetic_davis(os.path.join(tmp, 'davis'))
    status, stderr = run_in_process(
      video,
      [
        f'--workdir={workdir}',
        f'--davis_root={davis}',
        '--size=64',
        '--official',
      ],  # fmt: skip
    )
    self.assertEqual(status, 0, stderr)
    with open(os.path.join(workdir, 'eval', 'davis.json')) as f:
      record = json.load(f)

    pth = os.path.join(tmp, 'teacher.pth')
    interop.export_checkpoint(workdir, pth)  # as `interop export` does
    m = config.model
    model = self.official.vits.VisionTransformer(
      img_size=[m.img_size],
      patch_size=m.patch_size,
      embed_dim=m.embed_dim,
      depth=m.depth,
      num_heads=m.num_heads,
      qkv_bias=True,
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
    )
    model.load_state_dict(torch.load(pth), strict=True)
    model.eval()

    def imread(path):
      with Image.open(path) as im:
        return np.asarray(im.convert('RGB'))[:, :, ::-1]

    def resize(image, size):
      self.assertEqual(size, image.shape[1::-1])
      return image

    official = self.official
    read_frame = official.read_frame
    official.cv2 = types.SimpleNamespace(imread=imread, resize=resize)
    official.read_frame = lambda path: read_frame(path, scale_size=[64])
    out = os.path.join(tmp, 'official')
    args = argparse.Namespace(
      output_dir=out,
      n_last_frames=7,
      size_mask_neighborhood=12,
      topk=5,
      patch_size=m.patch_size,
    )
    official.args = args  # restrict_neighborhood reads the global
    video_dir = os.path.join(davis, 'JPEGImages', '480p', 'square')
    frames = official.read_frame_list(video_dir)
    annotations = [
      f.replace('JPEGImages', 'Annotations').replace('jpg', 'png')
      for f in frames
    ]
    first_seg, seg_ori = official.read_seg(
      annotations[0], m.patch_size, scale_size=[64]
    )
    try:
      with contextlib.redirect_stderr(io.StringIO()):  # tqdm
        official.eval_video_tracking_davis(
          args,
          model,
          frames,
          video_dir,
          first_seg,
          seg_ori,
          np.asarray(PALETTE, np.uint8).reshape(-1, 3),
        )
    finally:
      official.read_frame = read_frame
    gt, theirs = [], []
    for t, annotation in enumerate(annotations):
      name = f'{t:05d}.png'
      with Image.open(os.path.join(out, 'square', name)) as im:
        theirs.append(np.asarray(im))
      with Image.open(os.path.join(workdir, 'eval/davis/square', name)) as im:
        np.testing.assert_array_equal(np.asarray(im), theirs[-1], name)
      gt.append(video.read_labels(annotation))
    scores = davis_metrics.summarize(
      {'square': davis_metrics.sequence_scores(np.stack(gt), np.stack(theirs))}
    )
    for key in ('J', 'F', 'J&F'):
      self.assertAlmostEqual(record[key], scores[key], places=12)
    self.assertGreater(record['J'], 0.5)

  def test_first_labels_official_mode_matches_read_seg(self):
    tmp = self.create_tempdir().full_path
    labels = np.zeros((64, 64), np.uint8)
    labels[8:40, 16:48] = 1
    labels[50:52, 50:52] = 2  # smaller than a patch: gone on the grid
    path = os.path.join(tmp, 'a.png')
    im = Image.fromarray(labels, mode='P')
    im.putpalette(PALETTE)
    im.save(path)
    want, ori = self.official.read_seg(path, 8, scale_size=[64])
    onehot, full, _ = video.first_labels(path, (8, 8), official=True)
    np.testing.assert_array_equal(onehot.transpose(2, 0, 1), want[0].numpy())
    np.testing.assert_array_equal(full, ori)
    onehot, _, _ = video.first_labels(path, (8, 8))
    self.assertEqual(onehot.shape, (8, 8, 3))  # depth of the full mask
    self.assertEqual(onehot[..., 2].sum(), 0)


class FrameTest(absltest.TestCase):
  def test_frame_size(self):
    self.assertEqual(video.frame_size(480, 854, 480), (480, 832))
    self.assertEqual(video.frame_size(854, 480, 480), (832, 480))
    self.assertEqual(video.frame_size(64, 64, 64), (64, 64))
    self.assertEqual(video.frame_size(64, 100, 64), (64, 64))

  def test_read_frame_normalizes(self):
    tmp = self.create_tempdir().full_path
    path = os.path.join(tmp, 'f.jpg')
    Image.new('RGB', (100, 60), (255, 128, 0)).save(path, quality=100)
    x, hw = video.read_frame(path, 60, video.OFFICIAL_STD)
    self.assertEqual(hw, (60, 100))
    self.assertEqual(x.shape, (60, 64, 3))
    with Image.open(path) as im:
      rgb = np.asarray(im)[30, 50] / 255.0
    want = (rgb - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.228, 0.224, 0.225]
    )
    np.testing.assert_allclose(np.asarray(x)[30, 32], want, atol=1e-4)


def square(top, left, a, shape=(64, 64)):
  m = np.zeros(shape, bool)
  m[top : top + a, left : left + a] = True
  return m


class MetricsTest(absltest.TestCase):
  def test_identical_and_empty(self):
    m = square(10, 10, 12)
    self.assertEqual(davis_metrics.jaccard(m, m), 1.0)
    self.assertEqual(davis_metrics.f_measure(m, m), 1.0)
    empty = np.zeros_like(m)
    self.assertEqual(davis_metrics.jaccard(empty, empty), 1.0)
    self.assertEqual(davis_metrics.f_measure(empty, empty), 1.0)
    self.assertEqual(davis_metrics.jaccard(m, empty), 0.0)
    self.assertEqual(davis_metrics.f_measure(m, empty), 0.0)
    self.assertEqual(davis_metrics.f_measure(empty, m), 0.0)

  def test_disjoint(self):
    a, b = square(2, 2, 10), square(40, 40, 10)
    self.assertEqual(davis_metrics.jaccard(a, b), 0.0)
    self.assertEqual(davis_metrics.f_measure(a, b), 0.0)

  def test_shifted_square(self):
    # 10 x 10 shifted by 2 columns: 80 shared pixels of 120.
    a, b = square(10, 10, 10), square(10, 12, 10)
    self.assertAlmostEqual(davis_metrics.jaccard(a, b), 80 / 120)
    # Tolerance ceil(0.008 * 90.5) = 1 px: a 1-px shift matches fully.
    self.assertEqual(davis_metrics.tolerance((64, 64)), 1)
    self.assertEqual(davis_metrics.tolerance((480, 854)), 8)
    self.assertEqual(davis_metrics.f_measure(a, square(10, 11, 10)), 1.0)

  def test_boundary_of_a_square(self):
    # Last row and column inside (2a - 1), the row above and the column to
    # the left outside (2a + 1): 4a pixels.
    for a in (1, 3, 10):
      self.assertEqual(davis_metrics.boundary(square(20, 20, a)).sum(), 4 * a)

  def test_extra_blob_halves_precision(self):
    gt = square(5, 5, 10)
    pred = gt | square(40, 40, 5)
    # Precision 40 / (40 + 20), recall 1.
    p = 40 / 60
    self.assertAlmostEqual(davis_metrics.f_measure(gt, pred), 2 * p / (p + 1))

  def test_sequence_drops_first_and_last_frames(self):
    gt = np.zeros((4, 64, 64), np.int32)
    gt[:, 10:20, 10:20] = 1
    gt[:, 40:50, 40:50] = 2
    pred = gt.copy()
    pred[0] = 0
    pred[3] = 0
    pred[2][square(10, 10, 10)] = 0
    pred[2][square(10, 12, 10)] = 1
    scores = davis_metrics.sequence_scores(gt, pred)
    np.testing.assert_allclose(scores['J'], [(1 + 80 / 120) / 2, 1.0])
    self.assertEqual(scores['F'][1], 1.0)
    summary = davis_metrics.summarize({'a': scores})
    self.assertAlmostEqual(summary['J'], ((1 + 80 / 120) / 2 + 1) / 2)
    self.assertAlmostEqual(summary['J&F'], (summary['J'] + summary['F']) / 2)


PALETTE = [0, 0, 0, 200, 30, 30, 30, 200, 30] + [7] * (768 - 9)


def synthetic_davis(root, frames=6, size=64, seq='square'):
  """A square (label 1) moving 3 px a frame over noise, a still bar
  (label 2)."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, 'ImageSets', '2017'))
  with open(os.path.join(root, 'ImageSets', '2017', 'val.txt'), 'w') as f:
    f.write(f'{seq}\n')
  jpegs = os.path.join(root, 'JPEGImages', '480p', seq)
  annotations = os.path.join(root, 'Annotations', '480p', seq)
  os.makedirs(jpegs)
  os.makedirs(annotations)
  for t in range(frames):
    image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    labels = np.zeros((size, size), np.uint8)
    labels[16:32, 8 + 3 * t : 24 + 3 * t] = 1
    labels[44:56, 4:60] = 2
    image[labels == 1] = (230, 40, 40)
    image[labels == 2] = (40, 40, 230)
    Image.fromarray(image).save(os.path.join(jpegs, f'{t:05d}.jpg'))
    im = Image.fromarray(labels, mode='P')
    im.putpalette(PALETTE)
    im.save(os.path.join(annotations, f'{t:05d}.png'))
  return root


class CliTest(absltest.TestCase):
  def test_synthetic_davis(self):
    tmp = self.create_tempdir().full_path
    workdir = os.path.join(tmp, 'w')
    tiny_workdir(workdir)
    davis = synthetic_davis(os.path.join(tmp, 'davis'))
    status, stderr = run_in_process(
      video,
      [f'--workdir={workdir}', f'--davis_root={davis}', '--size=64'],
    )
    self.assertEqual(status, 0, stderr)
    with open(os.path.join(workdir, 'eval', 'davis.json')) as f:
      record = json.load(f)
    out = os.path.join(workdir, 'eval', 'davis', 'square')
    gt, pred = [], []
    for t in range(6):
      with Image.open(os.path.join(out, f'{t:05d}.png')) as im:
        self.assertEqual(im.mode, 'P')
        self.assertEqual(im.getpalette()[:9], PALETTE[:9])
        self.assertEqual(im.size, (64, 64))
        pred.append(np.asarray(im))
      ann = os.path.join(davis, 'Annotations', '480p', 'square')
      with Image.open(os.path.join(ann, f'{t:05d}.png')) as im:
        gt.append(np.asarray(im))
    np.testing.assert_array_equal(pred[0], gt[0])
    scores = davis_metrics.sequence_scores(np.stack(gt), np.stack(pred))
    summary = davis_metrics.summarize({'square': scores})
    for key in ('J', 'F', 'J&F'):
      self.assertAlmostEqual(record[key], summary[key])
    self.assertEqual(record['sequences']['square']['J'], scores['J'])
    self.assertEqual(len(scores['J']), 2)
    # A random-init tiny ViT still follows the coloured square and bar.
    self.assertGreater(record['J'], 0.5)
    self.assertFalse(record['official'])
    status, stderr = run_in_process(
      video,
      [
        f'--workdir={workdir}',
        f'--davis_root={davis}',
        '--size=64',
        '--official',
      ],
    )
    self.assertEqual(status, 0, stderr)
    with open(os.path.join(workdir, 'eval', 'davis.json')) as f:
      official = json.load(f)
    self.assertTrue(official['official'])
    # The std typo changes the features, hence some predictions.
    self.assertNotEqual(official['J'], record['J'])

  def test_bad_paths_are_one_error_line(self):
    tmp = self.create_tempdir().full_path
    workdir = os.path.join(tmp, 'w')
    missing = os.path.join(tmp, 'nowhere')
    davis = synthetic_davis(os.path.join(tmp, 'davis'))
    cases = [
      ([f'--davis_root={missing}'], missing),
      ([f'--davis_root={davis}', '--split=test'], '--split=test'),
      ([f'--davis_root={davis}', '--topk=0'], '--topk=0'),
    ]
    # A 64x64 video at --size=16 is 16x0 pixels (the long side floors to
    # 64): no patch.
    tiny_workdir(workdir)
    status, stderr = run_in_process(
      video, [f'--workdir={workdir}', f'--davis_root={davis}', '--size=16']
    )
    self.assertEqual(status, 1)
    (line,) = error_lines(stderr)
    self.assertIn('--size=16', line)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'eval')))
    workdir = os.path.join(tmp, 'w2')
    os.remove(os.path.join(davis, 'Annotations/480p/square/00003.png'))
    cases.append(([f'--davis_root={davis}'], '00003.png'))
    for argv, value in cases:
      status, stderr = run_in_process(video, [f'--workdir={workdir}', *argv])
      self.assertEqual(status, 1)
      (line,) = error_lines(stderr)
      self.assertIn(value, line)
      self.assertFalse(os.path.exists(workdir))


if __name__ == '__main__':
  absltest.main()
