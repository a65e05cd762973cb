"""The end-of-training evaluations beyond k-NN.

``evaluation.run.after_training`` with ``eval.linear`` and
``eval.mask_jaccard_images`` prints and records (WORKDIR/eval/
downstream.json) the lr-swept linear probe and the attention-mask Jaccard
of the trained teacher and its baselines; the numbers are those of the
evaluations called directly. With ``eval.retrieval_root``,
``eval.copydays_root`` and ``eval.davis_root`` the end of a run records the
three protocols' results, equal to what their CLIs record.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import tempfile
from unittest import mock

import numpy as np
import test_copy_detection
import test_retrieval
import test_video
import tiny_config
from absl.testing import absltest
from PIL import Image
from test_attention_masks import write_idx
from test_eval_cli import tiny_workdir

from dino_jax import parallel
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib
from dino_jax.cli import evals
from dino_jax.evaluation import (
  attention,
  copy_detection,
  linear,
  retrieval,
  video,
)
from dino_jax.evaluation import run as run_lib


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


def downstream_fixtures(root: str) -> dict:
  """The three protocols' tiny fixtures, and the config fields naming them."""
  test_retrieval.make_fixture(os.path.join(root, 'retrieval'))
  copydays = test_copy_detection.make_copydays(os.path.join(root, 'copydays'))
  whitening = test_copy_detection.make_folder(os.path.join(root, 'whit'), 4, 20)
  davis = test_video.synthetic_davis(os.path.join(root, 'davis'))
  return {
    'retrieval_root': os.path.join(root, 'retrieval'),
    'retrieval_imsize': 32,
    'copydays_root': copydays,
    'copydays_whitening': whitening,
    'copydays_imsize': 32,
    'davis_root': davis,
    'davis_size': 64,
  }


def _json(path):
  with open(path) as f:
    return json.load(f)


class ProtocolsAtTheEndOfTrainingTest(absltest.TestCase):
  """A run whose config names the three protocols' data records, at its
  end (``after_training``, as train.py calls it), what their CLIs record
  on its workdir."""

  def test_run_records_what_the_clis_record(self):
    root = tempfile.mkdtemp()
    fields = downstream_fixtures(root)
    workdir = os.path.join(root, 'w')
    tiny_workdir(workdir)  # the tiny config's state at step 0
    # The run's config (the saved one, the fields set as at the start).
    overrides = [
      '--config.eval.knn=false',
      '--config.eval.attention_images=0',
      *(f'--config.eval.{k}={v}' for k, v in fields.items()),
    ]
    config, mesh, state, step = workdir_lib.load_workdir(workdir, overrides)
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
      run_lib.after_training(config, workdir, mesh, state, step)
    self.assertIn('roxford5k (step 0): mAP M:', stdout.getvalue())
    self.assertIn('DAVIS val (step 0): J ', stdout.getvalue())
    record = _json(os.path.join(workdir, 'eval', 'downstream.json'))
    self.assertEqual(record['step'], 0)
    self.assertEqual(
      set(record), {'step', 'retrieval', 'copy_detection', 'davis'}
    )
    davis_dir = os.path.join(workdir, 'eval', 'davis', 'square')
    pngs = {n: open(os.path.join(davis_dir, n), 'rb').read()
            for n in sorted(os.listdir(davis_dir))}  # fmt: skip
    self.assertLen(pngs, 6)
    shutil.rmtree(os.path.join(workdir, 'eval', 'davis'))

    base = [f'--workdir={workdir}']
    for module, argv in (
      (retrieval, ['--data_root=' + fields['retrieval_root'], '--imsize=32']),
      (
        copy_detection,
        [
          '--data_root=' + fields['copydays_root'],
          '--whitening=' + fields['copydays_whitening'],
          '--imsize=32',
          '--batch_size=8',  # eval.batch_size
        ],
      ),
      (video, ['--davis_root=' + fields['davis_root'], '--size=64']),
    ):
      status, stderr = _run(module, base + argv)
      self.assertEqual(status, 0, stderr)
    clis = {
      'retrieval': 'retrieval_roxford5k.json',
      'copy_detection': 'copy_detection.json',
      'davis': 'davis.json',
    }
    for name, file in clis.items():
      cli = _json(os.path.join(workdir, 'eval', file))
      self.assertEqual(cli.pop('step'), 0)
      self.assertEqual(record[name], cli, name)
    # Scores that mean something: the copies find their originals, the
    # propagation follows the square.
    self.assertGreater(record['copy_detection']['blocks']['jpegqual/50']['mAP'],
                       0.9)  # fmt: skip
    self.assertGreater(record['davis']['J'], 0.5)
    self.assertEqual(record['retrieval']['num_queries'], 2)
    self.assertEqual(
      {n: open(os.path.join(davis_dir, n), 'rb').read() for n in pngs}, pngs
    )

  def test_a_bad_root_is_skipped_with_a_warning(self):
    config = tiny_config.get_config()
    config.eval.retrieval_root = '/nonexistent/retrieval'
    with self.assertLogs(run_lib.logger, 'WARNING') as logs:
      out = run_lib.downstream(config, '/unused', None, None, None, step=3)
    self.assertEqual(out, {})
    self.assertIn('retrieval skipped', logs.output[0])
    self.assertIn('/nonexistent/retrieval', logs.output[0])
    # A ResNet has no patch tokens: each protocol says so, and is skipped.
    config.model.arch = 'resnet18'
    config.eval.copydays_root = config.eval.davis_root = '/nonexistent'
    with self.assertLogs(run_lib.logger, 'WARNING') as logs:
      out = run_lib.downstream(config, '/unused', None, None, None, step=3)
    self.assertEqual(out, {})
    self.assertLen(logs.output, 3)
    for line in logs.output:
      self.assertIn('needs a ViT backbone', line)
      self.assertIn('model.arch=resnet18', line)

  def test_off_by_default(self):
    e = tiny_config.get_config().eval
    self.assertEqual((e.retrieval_root, e.copydays_root, e.davis_root),
                     ('', '', ''))  # fmt: skip


def _run(module, argv):
  """(exit status, stderr) of ``module``'s CLI, run in this process."""
  stderr = io.StringIO()
  with (
    contextlib.redirect_stdout(io.StringIO()),
    contextlib.redirect_stderr(stderr),
  ):
    status = evals.run(module.__name__.rsplit('.', 1)[1], ['prog', *argv])
  return status, stderr.getvalue()


class SignalTest(absltest.TestCase):
  """SIGTERM during an extraction: each CLI stops at the next image, batch
  or frame, exits 143 and writes nothing."""

  def test_sigterm_stops_each_protocol_writing_nothing(self):
    root = tempfile.mkdtemp()
    fields = downstream_fixtures(root)
    workdir = os.path.join(root, 'w')
    tiny_workdir(workdir)
    # (module, its reader, flags, reads before the stop): retrieval and
    # video check between images and frames; copy detection between
    # batches (the first: the 3 originals, padded to the device count).
    cases = [
      (
        retrieval,
        'load_image',
        ['--data_root=' + fields['retrieval_root'], '--imsize=32'],
        2,
      ),
      (
        copy_detection,
        'load_image',
        ['--data_root=' + fields['copydays_root'], '--imsize=32'],
        3,
      ),
      (
        video,
        'read_frame',
        ['--davis_root=' + fields['davis_root'], '--size=64'],
        2,
      ),
    ]
    for module, reader, argv, reads in cases:
      original = getattr(module, reader)
      calls = []

      def signalled(*args, original=original, calls=calls, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the signal comes while the 2nd is read
          os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

      with mock.patch.object(module, reader, signalled):
        status, stderr = _run(module, [f'--workdir={workdir}', *argv])
      self.assertEqual(status, 128 + signal.SIGTERM, stderr)
      self.assertIn('stopped by SIGTERM', stderr)
      self.assertLen(calls, reads, module.__name__)
      self.assertFalse(os.path.exists(os.path.join(workdir, 'eval')))


def test_davis_pngs_and_record_on_a_gs_workdir(gcs):
  """The end-of-run protocols write through ``storage``: a gs:// workdir."""
  root = tempfile.mkdtemp()
  fields = downstream_fixtures(root)
  bucket = f'downstream{os.getpid()}'
  url = gcs.create_bucket(bucket)
  config = tiny_config.get_config()
  config.eval.knn = False
  config.eval.attention_images = 0
  config.eval.davis_root = fields['davis_root']
  config.eval.davis_size = 64
  mesh = parallel.make_mesh()
  _, _, init_fn = step_lib.state_template(config)
  out = run_lib.after_training(config, f'{url}/w', mesh, init_fn(), step=5)
  pngs = [f'w/eval/davis/square/{t:05d}.png' for t in range(6)]
  names = gcs.list(bucket)
  assert set(pngs) | {'w/eval/downstream.json'} <= set(names), names
  assert [n for n in names if n.startswith('w/eval/davis/')] == pngs
  record = json.loads(gcs.read(bucket, 'w/eval/downstream.json'))
  assert record['step'] == 5
  assert record['davis'] == json.loads(json.dumps(out['davis']))
  with Image.open(io.BytesIO(gcs.read(bucket, pngs[3]))) as im:
    assert im.mode == 'P'
    assert im.size == (64, 64)


if __name__ == '__main__':
  absltest.main()
