"""benchmarks/lockstep.py: dino_jax's step against the official training.

A tiny model runs a few steps on both sides (the last layer frozen for the
first epoch, then trained) and every tracked quantity must agree to float
noise; a dino_jax side with another teacher momentum must be caught. The
official code is loaded from ``$DINO_OFFICIAL_REPO`` or
``../shared/official-dino`` beside the repository (as CI lays it out).
"""

import io
import os
import sys
from contextlib import redirect_stderr, redirect_stdout

import jax
import numpy as np
import pytest
import torch
from absl.testing import absltest, parameterized
from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import convergence  # noqa: E402
import lockstep  # noqa: E402

OFFICIAL_REPO = os.environ.get(
  'DINO_OFFICIAL_REPO',
  os.path.join(os.path.dirname(ROOT), 'shared', 'official-dino'),
)
HAVE_OFFICIAL = os.path.isfile(os.path.join(OFFICIAL_REPO, 'main_dino.py'))
STEPS = 4  # 2 epochs of 2: the last layer frozen in epoch 0, then trained
TOL = 1e-4  # 4 steps of the tiny model: at most 1.6e-5 (2026-12-07)


def setUpModule():
  global OFFICIAL
  OFFICIAL = convergence.load_official(OFFICIAL_REPO) if HAVE_OFFICIAL else None


def recipe(**model):
  config = tiny_config(batch_size=8)
  config.model.drop_path_rate = 0.0
  config.model.update(model)
  config.steps_per_epoch = 2
  config.optim.freeze_last_layer = 1
  config.data.source = 'synthetic'
  config.data.synthetic_size = 32
  config.data.canvas_size = 32
  return config


def run(config, steps=STEPS, **kwargs):
  rows = []
  with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
    result = lockstep.run_lockstep(
      OFFICIAL,
      config,
      steps,
      tol=TOL,
      devices=jax.devices()[:1],
      emit=rows.append,
      **kwargs,
    )
  return result, rows


@absltest.skipUnless(HAVE_OFFICIAL, f'no official code at {OFFICIAL_REPO}')
class LockstepTest(parameterized.TestCase):
  @parameterized.parameters(
    dict(attention='einsum'),
    dict(attention='fused'),
    # The blocks under nn.scan: stacked parameters, gradients and Adam
    # moments named per block (blocks.{i}.*) for the comparison.
    dict(scan_blocks=True),
  )
  def test_equal_to_the_official_step(self, **model):
    result, rows = run(recipe(**model))
    self.assertEqual(result['steps'], STEPS)
    self.assertEqual([r['step'] for r in rows], list(range(STEPS)))
    self.assertEqual(set(result['max_rel']), set(lockstep.QUANTITIES))
    self.assertIsNone(result['first_over'], result)
    for quantity, rel in result['max_rel'].items():
      self.assertLess(rel, TOL, quantity)
    # The key part of qkv.bias is rounding noise, reported apart: it must
    # be there and must differ (else it would belong to the checked ones).
    self.assertGreater(result['untracked_max_rel']['student_key_bias'], TOL)
    # The comparison saw the training move: lr 0 at step 0 (warmup), the
    # last layer's Adam state untouched while frozen, then updated.
    self.assertEqual(rows[0]['official']['lr'], 0.0)
    self.assertGreater(rows[-1]['official']['lr'], 0.0)
    self.assertNotEqual(
      rows[0]['official']['loss'], rows[-1]['official']['loss']
    )

  def test_resnet_equal_to_the_official_step(self):
    self.check_resnet('sgd')

  @pytest.mark.slow  # a second ResNet step compile: about 25 s
  def test_resnet_with_lars_and_head_bn_equal_to_the_official_step(self):
    result = self.check_resnet('lars', use_bn_in_head=True)
    # The head biases its BatchNorms cancel are rounding noise on both
    # sides, reported apart (else they would belong to the checked ones).
    self.assertGreater(result['untracked_max_rel']['student_bn_bias'], TOL)

  def check_resnet(self, optimizer, **model):
    # A narrow resnet18 (8 to 64 channels) at 32 px, BatchNorm in train mode
    # on both sides, the official SGD or LARS: 3 steps, the last layer
    # frozen in the first two.
    config = recipe(arch='resnet18', resnet_width=8, **model)
    config.optim.name = optimizer
    # Peak lr 0.5 x 8 / 256 = 0.016: largest difference 2.1e-5 (the
    # clipped gradients; 4.5e-5 at 4x this lr). 2026-12-07.
    config.optim.lr = 0.5
    config.optim.weight_decay = config.optim.weight_decay_end = 1e-4
    result, rows = run(config, steps=3)
    self.assertEqual(
      set(result['max_rel']),
      set(lockstep.quantities(config)),
    )
    for quantity in (
      'momentum_buffer',
      'student_batch_stats',
      'teacher_batch_stats',
    ):
      self.assertIn(quantity, result['max_rel'])
    self.assertIsNone(result['first_over'], result)
    for quantity, rel in result['max_rel'].items():
      self.assertLess(rel, TOL, quantity)
    # The step moved what is compared (lr > 0 from step 1). A side whose
    # first step started from the official step's running statistics
    # (aliased torch buffers) was 0.81 off in student_batch_stats.
    self.assertGreater(rows[-1]['official']['lr'], 0.0)
    self.assertNotEqual(
      rows[0]['official']['loss'], rows[-1]['official']['loss']
    )
    return result

  def test_a_different_teacher_momentum_is_reported(self):
    config = recipe()
    other = recipe()
    other.optim.momentum_teacher = 0.99  # official side: 0.996
    result, rows = run(config, steps=2, jax_config=other)
    self.assertEqual(
      result['first_over'],
      {'step': 0, 'quantity': 'momentum', 'rel': rows[0]['rel']['momentum']},
    )
    self.assertAlmostEqual(rows[0]['rel']['momentum'], 0.006 / 0.996, 6)
    # From step 1 on (the first step with lr > 0) the teacher moves apart.
    self.assertGreater(rows[1]['rel']['teacher'], TOL)

  def test_the_key_bias_changes_no_output(self):
    # Why the key part of qkv.bias is left out of the check: on the official
    # ViT, shifting it leaves the output as is; shifting the q part does not.
    torch.manual_seed(0)
    vit = OFFICIAL.vits.vit_tiny(patch_size=8, img_size=[32])
    x = torch.randn(2, 3, 32, 32)
    bias = vit.blocks[0].attn.qkv.bias
    d = bias.shape[0] // 3
    with torch.no_grad():
      before = vit(x)
      bias[d : 2 * d] += torch.randn(d)
      np.testing.assert_allclose(vit(x), before, atol=1e-5)
      bias[:d] += torch.randn(d)
      self.assertGreater(float((vit(x) - before).abs().max()), 1e-2)
    named = {'blocks.0.attn.qkv.bias': np.arange(6.0), 'norm.bias': np.ones(2)}
    rest, keys = lockstep.split_key_bias(named)
    np.testing.assert_array_equal(rest['blocks.0.attn.qkv.bias'], [0, 1, 4, 5])
    np.testing.assert_array_equal(keys['blocks.0.attn.qkv.bias'], [2, 3])
    self.assertEqual(list(keys), ['blocks.0.attn.qkv.bias'])
    np.testing.assert_array_equal(rest['norm.bias'], named['norm.bias'])

  def test_stochastic_depth_is_one_error_line(self):
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
      rc = lockstep.main(
        [
          '--official_repo',
          OFFICIAL_REPO,
          '--steps=2',
          '--config.model.drop_path_rate=0.1',
        ]
      )
    self.assertEqual(rc, 1)
    lines = err.getvalue().strip().splitlines()
    self.assertLen(lines, 1)
    self.assertStartsWith(lines[0], 'error: model.drop_path_rate=0.1')


if __name__ == '__main__':
  absltest.main()
