"""The ResNet in the train step: BatchNorm statistics, resume, mesh, eval.

A narrow resnet18 (``model.resnet_width=8``) on 32 px global and 16 px local
crops. The running statistics are checked against torch float64 convs of
the same crops (SPEC-downstream §5: student and teacher in train mode, one
backbone pass per resolution, the EMA over parameters only).
"""

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl.testing import absltest
from tiny import crop_batch, tiny_config

from dino_jax import checkpoint as checkpoint_lib
from dino_jax import parallel
from dino_jax import step as step_lib
from dino_jax.evaluation import features
from dino_jax.evaluation import run as eval_run

BATCH = 8


def resnet_config(**changes):
  config = tiny_config(batch_size=BATCH)
  config.model.arch = 'resnet18'
  config.model.resnet_width = 8
  config.optim.name = 'sgd'
  config.optim.lr = 0.03
  config.optim.weight_decay = config.optim.weight_decay_end = 1e-4
  for key, value in changes.items():
    config.model[key] = value
  return config


def build(config):
  sched = step_lib.Schedules.from_config(config, steps_per_epoch=5)
  student, teacher = step_lib.build_models(config)
  tx = step_lib.build_optimizer(config, sched)
  state = jax.jit(step_lib.init_fn_for(config, student, tx))()
  fn = step_lib.make_train_step(student, teacher, tx, sched)
  return student, teacher, state, fn, sched


def stem_stats(kernel, crops):
  """Per-channel mean and unbiased variance of conv1 on ``crops``, torch
  float64 (Conv2d(3, C, 7, stride 2, padding 3, bias=False))."""
  x = np.asarray(crops, np.float64).reshape(-1, *crops.shape[-3:])
  y = torch.nn.functional.conv2d(
    torch.from_numpy(x).permute(0, 3, 1, 2),
    torch.from_numpy(np.asarray(kernel, np.float64)).permute(3, 2, 0, 1),
    stride=2,
    padding=3,
  )
  return (
    y.mean(dim=(0, 2, 3)).numpy(),
    y.var(dim=(0, 2, 3), unbiased=True).numpy(),
  )


class ResNetStepTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = resnet_config()
    cls.student, cls.teacher, cls.state, fn, cls.sched = build(cls.config)
    cls.step = staticmethod(jax.jit(fn))
    cls.batches = [crop_batch(i, BATCH) for i in range(4)]

  def test_state_holds_both_running_statistics_at_init(self):
    stats = self.state.batch_stats
    self.assertEqual(set(stats), {'student', 'teacher'})
    bn1 = stats['teacher']['backbone']['bn1']
    np.testing.assert_array_equal(bn1['mean'], np.zeros(8))
    np.testing.assert_array_equal(bn1['var'], np.ones(8))
    leaves = jax.tree.leaves(stats['student'])
    self.assertLen(leaves, 2 * 20)  # resnet18: 20 BatchNorms, no head BN

  def test_one_step_updates_statistics_as_the_official_code(self):
    batch = self.batches[0]
    new, _ = self.step(self.state, batch)
    kernel = self.state.student['backbone']['conv1']['kernel']
    mean_g, var_g = stem_stats(kernel, batch['global_crops'])
    mean_l, var_l = stem_stats(kernel, batch['local_crops'])
    # Teacher: train mode on the global crops, its own running statistics,
    # one update (momentum 0.1, unbiased variance).
    t = new.batch_stats['teacher']['backbone']['bn1']
    np.testing.assert_allclose(t['mean'], 0.1 * mean_g, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(t['var'], 0.9 + 0.1 * var_g, rtol=1e-5)
    # Student: one pass for the global crops, then one for the local crops.
    s = new.batch_stats['student']['backbone']['bn1']
    want_mean = 0.9 * (0.1 * mean_g) + 0.1 * mean_l
    want_var = 0.9 * (0.9 + 0.1 * var_g) + 0.1 * var_l
    np.testing.assert_allclose(s['mean'], want_mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s['var'], want_var, rtol=1e-5)
    # One pass over all crops at once cannot give these (mixed resolutions).
    self.assertGreater(np.abs(np.asarray(s['mean']) - t['mean']).max(), 1e-4)
    # The EMA covers the parameters: teacher = m teacher + (1 - m) student.
    m = float(self.sched.momentum[0])
    old = self.state.teacher['backbone']['layer4_1']['conv2']['kernel']
    stu = new.student['backbone']['layer4_1']['conv2']['kernel']
    got = new.teacher['backbone']['layer4_1']['conv2']['kernel']
    np.testing.assert_allclose(got, m * old + (1 - m) * stu, rtol=1e-5)

  def test_resume_is_bit_identical(self):
    straight = self.state
    losses = []
    for batch in self.batches:
      straight, metrics = self.step(straight, batch)
      losses.append(float(metrics['loss']))
    half = self.state
    for batch in self.batches[:2]:
      half, _ = self.step(half, batch)
    with tempfile.TemporaryDirectory() as tmp:
      ckpt = checkpoint_lib.Checkpointer(
        os.path.join(tmp, 'ckpt'), async_save=False
      )
      ckpt.save(2, half, self.config)
      ckpt.wait()
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      shape = jax.eval_shape(lambda: half)
      abstract = checkpoint_lib.abstract_like(
        shape, jax.tree.map(lambda _: device, shape)
      )
      resumed = ckpt.restore(2, abstract)
      ckpt.close()
    self.assertIsNotNone(resumed.batch_stats)
    resumed_losses = []
    for batch in self.batches[2:]:
      resumed, metrics = self.step(resumed, batch)
      resumed_losses.append(float(metrics['loss']))
    self.assertEqual(resumed_losses, losses[2:])
    flat_a = jax.tree_util.tree_leaves_with_path(straight)
    flat_b = jax.tree_util.tree_leaves_with_path(resumed)
    self.assertEqual([p for p, _ in flat_a], [p for p, _ in flat_b])
    for (path, a), (_, b) in zip(flat_a, flat_b, strict=True):
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    # The running statistics moved with training (not stuck at init).
    var = straight.batch_stats['teacher']['backbone']['layer4_1']['bn2']['var']
    self.assertGreater(np.abs(np.asarray(var) - 1.0).max(), 1e-3)

  def test_evaluation_uses_the_teachers_running_statistics(self):
    state, _ = self.step(self.state, self.batches[0])
    variables = step_lib.teacher_backbone(state)
    self.assertIs(
      variables['batch_stats'], state.batch_stats['teacher']['backbone']
    )
    images = self.batches[1]['global_crops'][0]
    got = features.jit_feature_fn(self.teacher.backbone)(variables, images)
    # Inference mode, by hand: the stem's BatchNorm on the running
    # statistics, checked through a backbone whose later layers see it.
    want = self.teacher.backbone.apply(variables, images, False)
    np.testing.assert_array_equal(got, want)
    batch_mode, _ = self.teacher.backbone.apply(
      variables, images, True, mutable=['batch_stats']
    )
    self.assertGreater(np.abs(np.asarray(got) - batch_mode).max(), 1e-3)
    student_stats = {
      'params': variables['params'],
      'batch_stats': state.batch_stats['student']['backbone'],
    }
    other = self.teacher.backbone.apply(student_stats, images, False)
    self.assertGreater(np.abs(np.asarray(got) - other).max(), 1e-5)
    # A linear probe takes the pooled features (official eval_linear.py).
    probe = features.jit_feature_fn(self.teacher.backbone, None, 'probe')
    np.testing.assert_array_equal(probe(variables, images), got)

  def test_attention_evaluations_skip_a_resnet_with_a_warning(self):
    # A ResNet has no attention: the end of a run skips the maps (before:
    # a crash after training), k-NN off here to keep the test short.
    config = resnet_config()
    config.eval.knn = False
    config.eval.attention_images = 2
    config.data.source, config.data.synthetic_size = 'synthetic', 8
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    workdir = self.create_tempdir().full_path
    with self.assertLogs(eval_run.logger, 'WARNING') as logs:
      out = eval_run.after_training(config, workdir, mesh, self.state, 0)
    self.assertNotIn('attention', out)
    self.assertIn('attention evaluations skipped', logs.output[0])
    self.assertIn(f'model.arch={config.model.arch}', logs.output[0])
    self.assertFalse(os.path.exists(os.path.join(workdir, 'eval')))

  def test_random_init_baseline_carries_init_statistics(self):
    config = resnet_config()
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    init = eval_run._random_init(config, mesh, self.teacher.backbone)
    bn1 = init['batch_stats']['bn1']
    np.testing.assert_array_equal(bn1['mean'], np.zeros(8))
    np.testing.assert_array_equal(bn1['var'], np.ones(8))
    images = self.batches[1]['global_crops'][0]
    got = features.jit_feature_fn(self.teacher.backbone)(init, images)
    self.assertEqual(got.shape, (BATCH, 64))
    self.assertTrue(np.isfinite(np.asarray(got)).all())


class Bfloat16Test(absltest.TestCase):
  def test_bfloat16_compute_keeps_float32_statistics(self):
    config = resnet_config()
    config.model.dtype = 'bfloat16'
    _, teacher = step_lib.build_models(config)
    backbone = teacher.backbone
    images = crop_batch(3, BATCH)['global_crops'][0]
    variables = jax.jit(backbone.init)(jax.random.PRNGKey(0), images)
    f32 = backbone.clone(dtype=jnp.float32)
    outs = {}
    for name, model in (('bf16', backbone), ('f32', f32)):
      outs[name] = jax.jit(
        lambda v, x, m=model: m.apply(v, x, True, mutable=['batch_stats'])
      )(variables, images)
    (got, got_stats), (want, want_stats) = outs['bf16'], outs['f32']
    self.assertEqual(got.dtype, jnp.float32)  # pooled in float32
    # 20 bf16 convs (8-bit mantissa) in train mode, where BatchNorm over 8
    # values per channel (layer4 is 1x1) amplifies them: 5.4 %.
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    self.assertBetween(err, 1e-4, 0.1)  # above 0: bf16 did run
    # Inference mode on the running statistics: 1.1 %.
    eval_vars = {**variables, **want_stats}
    got = backbone.apply(eval_vars, images)
    want = f32.apply(eval_vars, images)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    self.assertBetween(err, 1e-4, 3e-2)
    for a, b in zip(
      jax.tree.leaves(got_stats), jax.tree.leaves(want_stats), strict=True
    ):
      self.assertEqual(a.dtype, jnp.float32)
      rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
      self.assertLess(rel, 5e-2)


class ViTStateTest(absltest.TestCase):
  def test_vit_state_has_the_leaves_it_had(self):
    config = tiny_config()
    student, _ = step_lib.build_models(config)
    sched = step_lib.Schedules.from_config(config, 5)
    tx = step_lib.build_optimizer(config, sched)
    shape = jax.eval_shape(step_lib.init_fn_for(config, student, tx))
    self.assertIsNone(shape.batch_stats)
    tops = {
      jax.tree_util.keystr(p[:1])
      for p, _ in jax.tree_util.tree_leaves_with_path(shape)
    }
    self.assertEqual(tops, {f'.{n}' for n in step_lib._STATE_FIELDS})
    # The features take the params themselves.
    self.assertIs(step_lib.teacher_backbone(shape), shape.teacher['backbone'])


class MeshTest(absltest.TestCase):
  @pytest.mark.slow  # two step compiles, about 40 s
  def test_eight_devices_equal_one_and_split_the_work(self):
    # 4 images per device: the work on the replicated parameters (SGD,
    # EMA: ~3 MFLOP a device) is then small against the crops' share.
    config = resnet_config()
    config.batch_size = 32
    batch = crop_batch(7, 32)
    results = {}
    for n in (1, 8):
      mesh = parallel.make_mesh(devices=jax.devices()[:n])
      _, _, init, fn, _ = build(config)
      shape = jax.eval_shape(lambda s: s, init)
      shardings = parallel.state_sharding(mesh, shape)
      state = jax.device_put(init, shardings)
      compiled = (
        parallel.jit_train_step(fn, mesh, shardings, batch)
        .lower(state, batch)
        .compile()
      )
      losses = []
      for _ in range(2):
        state, metrics = compiled(state, batch)
        losses.append(float(metrics['loss']))
      results[n] = (
        jax.device_get(state),
        losses,
        compiled.cost_analysis()['flops'],
      )
    (one, losses1, flops1), (eight, losses8, flops8) = results[1], results[8]
    # Per-device statistics (4 images; layer4's map is 1x1 on the local
    # crops) would differ from the global ones; these agree.
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    for name in ('student', 'teacher'):
      jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
        eight.batch_stats[name],
        one.batch_stats[name],
      )
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      eight.student,
      one.student,
    )
    # Each device computes its share (no activation gathered).
    ideal = flops1 / 8
    self.assertLessEqual(flops8, 1.2 * ideal, f'{flops8:.3g} vs {ideal:.3g}')
    self.assertGreater(flops8, 0.8 * ideal)


if __name__ == '__main__':
  absltest.main()
