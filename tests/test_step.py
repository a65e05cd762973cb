"""The train step: sharding invariance, EMA, center, freeze, learning."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from tiny import crop_batch, tiny_config

from dino_jax import config as config_lib
from dino_jax import loss as loss_lib
from dino_jax import parallel
from dino_jax import step as step_lib


def build(config, steps_per_epoch=5, sched=None):
  sched = sched or step_lib.Schedules.from_config(config, steps_per_epoch)
  student, teacher = step_lib.build_models(config)
  tx = step_lib.build_optimizer(config, sched)
  state = step_lib.init_state(
    jax.random.PRNGKey(config.seed),
    student,
    tx,
    config.crops.global_size,
    config.model.out_dim,
  )
  fn = step_lib.make_train_step(student, teacher, tx, sched)
  return student, teacher, state, fn, sched


def run_on_mesh(config, mesh, batch, n_steps, fsdp_min_size=2**18):
  _, _, state, fn, _ = build(config)
  shardings = parallel.state_sharding(
    mesh, jax.eval_shape(lambda: state), fsdp_min_size
  )
  state = jax.device_put(state, shardings)
  jitted = parallel.jit_train_step(fn, mesh, shardings, batch)
  losses = []
  for _ in range(n_steps):
    state, metrics = jitted(state, batch)
    losses.append(float(metrics['loss']))
  return jax.device_get(state), losses, jitted


def run_steps_global(mesh, n_steps, seed=5):
  """Train steps on a deterministic global batch; works across processes.

  Every process builds the same global arrays and supplies the shards its
  devices hold (``make_array_from_callback``).
  """
  config = tiny_config()
  _, _, state, fn, _ = build(config)
  shardings = parallel.state_sharding(mesh, jax.eval_shape(lambda: state))
  state = jax.tree.map(
    lambda x, s: jax.make_array_from_callback(
      x.shape, s, lambda idx, x=x: np.asarray(x)[idx]
    ),
    state,
    shardings,
  )
  host_batch = jax.tree.map(np.asarray, crop_batch(seed))
  batch_sh = parallel.tree_batch_sharding(mesh, host_batch)
  batch = jax.tree.map(
    lambda x, s: jax.make_array_from_callback(
      x.shape, s, lambda idx, x=x: x[idx]
    ),
    host_batch,
    batch_sh,
  )
  jitted = parallel.jit_train_step(fn, mesh, shardings, batch)
  losses = []
  for _ in range(n_steps):
    state, metrics = jitted(state, batch)
    losses.append(float(metrics['loss']))
  checksum = float(
    jax.jit(
      lambda t: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(t)),
      out_shardings=parallel.replicated(mesh),
    )(state.student)
  )
  return losses, checksum


def build_on(backend, config):
  """(student, teacher, state shapes, step fn) built as on ``backend``.

  ``jax.default_backend()`` reports ``backend`` while the models are built;
  the state is only traced (``eval_shape``), nothing is compiled.
  """
  orig = jax.default_backend
  jax.default_backend = lambda: backend
  try:
    student, teacher = step_lib.build_models(config)
  finally:
    jax.default_backend = orig
  sched = step_lib.Schedules.from_config(config, 5)
  tx = step_lib.build_optimizer(config, sched)
  state = jax.eval_shape(step_lib.init_fn_for(config, student, tx))
  fn = step_lib.make_train_step(student, teacher, tx, sched)
  return student, teacher, state, fn


class ComputeResolutionTest(parameterized.TestCase):
  """model.dtype / model.attention 'auto' (docs/precision.md)."""

  @parameterized.parameters(
    ('cpu', 'auto', 'auto', ('float32', 'einsum')),
    ('gpu', 'auto', 'auto', ('bfloat16', 'fused')),
    ('tpu', 'auto', 'auto', ('bfloat16', 'einsum')),  # docs/bytes.md
    ('gpu', 'float32', 'auto', ('float32', 'fused')),
    ('gpu', 'float32', 'einsum', ('float32', 'einsum')),
    ('cpu', 'bfloat16', 'fused', ('bfloat16', 'fused')),
  )
  def test_resolve(self, backend, dtype, attention, expected):
    config = tiny_config()
    config.model.dtype, config.model.attention = dtype, attention
    self.assertEqual(
      config_lib.resolve_compute(config.model, backend), expected
    )

  def test_imagenet_configs_default_to_auto(self):
    from configs import fashion_mnist, vit_b8, vit_b16, vit_s8, vit_s16
    from configs.fashion_mnist import VARIANTS

    for module in (vit_s16, vit_s8, vit_b16, vit_b8):
      model = module.get_config().model
      self.assertEqual((model.dtype, model.attention), ('auto', 'auto'))
      self.assertEqual(
        config_lib.resolve_compute(model, 'cpu'), ('float32', 'einsum')
      )
      self.assertEqual(
        config_lib.resolve_compute(model, 'gpu'), ('bfloat16', 'fused')
      )
    for variant in VARIANTS:  # the demo, as measured: float32 everywhere
      model = fashion_mnist.get_config(variant).model
      self.assertEqual(
        config_lib.resolve_compute(model, 'gpu'), ('float32', 'einsum')
      )

  def test_unknown_values_name_the_choices(self):
    config = tiny_config()
    config.model.dtype = 'float16'
    with self.assertRaisesRegex(config_lib.ConfigError, "'auto'"):
      config_lib.resolve_compute(config.model, 'gpu')
    config.model.dtype, config.model.attention = 'auto', 'splash'
    with self.assertRaisesRegex(config_lib.ConfigError, 'splash'):
      config_lib.validate(config)

  def test_build_models_resolves_for_the_backend_and_logs(self):
    config = tiny_config()
    config.model.dtype = config.model.attention = 'auto'
    with self.assertLogs(level='INFO') as logs:
      student, teacher, _, _ = build_on('gpu', config)
    self.assertIn('dtype bfloat16, attention fused on gpu', logs.output[0])
    for model in (student, teacher):
      self.assertEqual(model.backbone.dtype, jnp.bfloat16)
      self.assertEqual(model.backbone.attention, 'fused')
      self.assertEqual(model.head.dtype, jnp.bfloat16)
    student, _ = step_lib.build_models(config)  # the real backend: cpu
    self.assertEqual(student.backbone.dtype, jnp.float32)
    self.assertEqual(student.backbone.attention, 'einsum')
    self.assertEqual(config.model.dtype, 'auto')  # saved as given

  def test_auto_step_on_gpu_keeps_float32_state(self):
    # The step a GPU builds from 'auto' (bf16, fused), traced on the CPU;
    # test_bfloat16_step_close_to_float32 runs a bf16 step for the numbers.
    config = tiny_config()
    config.model.dtype = config.model.attention = 'auto'
    student, _, state, fn = build_on('gpu', config)
    batch = {
      'global_crops': jax.ShapeDtypeStruct((2, 4, 32, 32, 3), jnp.float32),
      'local_crops': jax.ShapeDtypeStruct((2, 4, 16, 16, 3), jnp.float32),
    }
    new_state, metrics = jax.eval_shape(fn, state, batch)
    chex.assert_trees_all_equal_dtypes(new_state, state)  # params, opt
    chex.assert_type(jax.tree.leaves(state.student), jnp.float32)
    chex.assert_type(new_state.center, jnp.float32)
    chex.assert_type(metrics['loss'], jnp.float32)
    # The compute really is bf16: the head's output before the loss.
    out = jax.eval_shape(
      lambda p, x: student.head.apply({'params': p}, x),
      state.student['head'],
      jax.ShapeDtypeStruct((2, 32), jnp.float32),
    )
    self.assertEqual(out.dtype, jnp.bfloat16)


class StepTest(absltest.TestCase):
  # Every comparison here is between runs compiled alike; without XLA's
  # optimizations the tiny steps compile in about half the time.
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._optimizations = jax.config.read('jax_disable_most_optimizations')
    jax.config.update('jax_disable_most_optimizations', True)

  @classmethod
  def tearDownClass(cls):
    jax.config.update('jax_disable_most_optimizations', cls._optimizations)
    super().tearDownClass()

  def test_sharded_equals_single_device(self):
    self.assertGreaterEqual(jax.device_count(), 8)
    config = tiny_config()
    batch = crop_batch(0)
    single, losses1, _ = run_on_mesh(
      config, parallel.make_mesh(devices=jax.devices()[:1]), batch, 3
    )
    mesh8 = parallel.make_mesh(devices=jax.devices()[:8])
    sharded, losses8, jitted = run_on_mesh(config, mesh8, batch, 3)
    np.testing.assert_allclose(losses8, losses1, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(
      sharded.student, single.student, atol=1e-5, rtol=1e-5
    )
    chex.assert_trees_all_close(
      sharded.teacher, single.teacher, atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(sharded.center, single.center, atol=1e-6)
    self.assertEqual(jitted._cache_size(), 1)  # no recompilation

  def test_fsdp_equals_replicated(self):
    config = tiny_config()
    batch = crop_batch(3)
    mesh = parallel.make_mesh(devices=jax.devices()[:8])
    ref, ref_losses, _ = run_on_mesh(config, mesh, batch, 2)
    fsdp_mesh = parallel.make_mesh(data=2, fsdp=4)
    shardings = parallel.state_sharding(
      fsdp_mesh, jax.eval_shape(lambda: ref), 256
    )
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    self.assertTrue(any('fsdp' in spec for spec in specs))  # really sharded
    got, losses, _ = run_on_mesh(config, fsdp_mesh, batch, 2, 256)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    chex.assert_trees_all_close(got.student, ref.student, atol=1e-5)
    chex.assert_trees_all_close(got.teacher, ref.teacher, atol=1e-5)

  def test_leaf_spec_rule(self):
    self.assertEqual(
      parallel.leaf_spec((384, 1536), 4, 1000),
      jax.sharding.PartitionSpec(None, 'fsdp'),
    )
    self.assertEqual(
      parallel.leaf_spec((6, 10), 4, 1), jax.sharding.PartitionSpec()
    )  # nothing divisible
    self.assertEqual(
      parallel.leaf_spec((384,), 4, 1000), jax.sharding.PartitionSpec()
    )  # small: replicated
    self.assertEqual(
      parallel.leaf_spec((384, 1536), 1, 1), jax.sharding.PartitionSpec()
    )

  def test_bfloat16_step_close_to_float32(self):
    batch = crop_batch(4)
    config = tiny_config()
    _, _, state, fn, _ = build(config)
    _, ref = jax.jit(fn)(state, batch)
    config.model.dtype = 'bfloat16'
    _, _, state16, fn16, _ = build(config)
    chex.assert_trees_all_equal(state16.student, state.student)  # fp32 params
    new16, metrics = jax.jit(fn16)(state16, batch)
    chex.assert_type(metrics['loss'], jnp.float32)
    chex.assert_trees_all_equal_dtypes(new16.student, state.student)
    np.testing.assert_allclose(metrics['loss'], ref['loss'], rtol=2e-2)
    self.assertNotEqual(float(metrics['loss']), float(ref['loss']))

  def test_no_retrace_after_first_step(self):
    config = tiny_config()
    student, teacher, state, _, sched = build(config)
    tx = step_lib.build_optimizer(config, sched)
    fn = jax.jit(
      chex.assert_max_traces(
        step_lib.make_train_step(student, teacher, tx, sched), n=1
      )
    )
    for seed in range(3):
      state, _ = fn(state, crop_batch(seed))
    self.assertEqual(int(state.step), 3)

  def test_teacher_starts_as_copy_and_center_zero(self):
    config = tiny_config()
    _, _, state, _, _ = build(config)
    chex.assert_trees_all_equal(state.teacher, state.student)
    chex.assert_shape(state.center, (1, 64))
    np.testing.assert_array_equal(state.center, 0)

  def ema_after_one_step(self, momentum_value):
    config = tiny_config()
    sched = step_lib.Schedules.from_config(config, 5)
    sched = dataclasses.replace(
      sched, momentum=np.full_like(sched.momentum, momentum_value)
    )
    config.optim.lr = 0.05
    config.optim.warmup_epochs = 0
    sched = dataclasses.replace(sched, lr=np.full_like(sched.lr, 1e-3))
    _, _, state, fn, _ = build(config, sched=sched)
    # Make teacher differ from student first.
    state = state.replace(
      teacher=jax.tree.map(lambda x: x + 1.0, state.teacher)
    )
    new_state, metrics = jax.jit(fn)(state, crop_batch(1))
    self.assertAlmostEqual(float(metrics['momentum']), momentum_value)
    return state, new_state

  def test_ema_momentum_one_keeps_teacher(self):
    old, new = self.ema_after_one_step(1.0)
    chex.assert_trees_all_equal(new.teacher, old.teacher)
    self.assertFalse(
      np.allclose(
        new.student['backbone']['cls_token'],
        old.student['backbone']['cls_token'],
      )
    )

  def test_ema_momentum_zero_copies_student(self):
    _, new = self.ema_after_one_step(0.0)
    chex.assert_trees_all_equal(new.teacher, new.student)

  def test_center_update_and_metrics(self):
    config = tiny_config()
    _, teacher, state, fn, sched = build(config)
    batch = crop_batch(2)
    new_state, metrics = jax.jit(fn)(state, batch)
    teacher_out = teacher.apply(
      {'params': state.teacher}, batch['global_crops']
    )
    np.testing.assert_allclose(
      new_state.center,
      loss_lib.update_center(state.center, teacher_out, 0.9),
      atol=1e-6,
    )
    self.assertEqual(float(metrics['lr']), 0.0)  # first lr is 0 (warmup)
    self.assertAlmostEqual(float(metrics['wd']), 0.04, places=7)
    self.assertAlmostEqual(float(metrics['teacher_temp']), 0.04, places=7)
    self.assertEqual(int(new_state.step), 1)
    np.testing.assert_array_equal(new_state.rng, state.rng)
    for name in (
      'loss',
      'teacher_entropy',
      'kl',
      'grad_norm',
      'teacher_prototypes',
      'momentum',
      'center_norm',
    ):
      self.assertTrue(np.isfinite(metrics[name]), name)

  def test_last_layer_frozen_for_first_epoch(self):
    config = tiny_config()
    config.optim.warmup_epochs = 0  # nonzero lr from step 0
    _, _, state, fn, _ = build(config, steps_per_epoch=3)
    fn = jax.jit(fn)
    start = state.student['head']['last_layer']['weight_v']
    backbone0 = state.student['backbone']['cls_token']
    for i in range(4):
      state, _ = fn(state, crop_batch(i))
      last = state.student['head']['last_layer']['weight_v']
      if i < 3:
        np.testing.assert_array_equal(last, start)
      else:
        self.assertFalse(np.allclose(last, start))
    self.assertFalse(
      np.allclose(state.student['backbone']['cls_token'], backbone0)
    )

  def test_loss_decreases_without_collapse(self):
    config = tiny_config()
    config.epochs = 1
    config.optim.warmup_epochs = 0
    config.optim.lr = 0.01
    config.optim.momentum_teacher = 0.9
    config.optim.freeze_last_layer = 0
    config.optim.weight_decay_end = 0.04
    config.model.drop_path_rate = 0.0
    _, _, state, fn, _ = build(config, steps_per_epoch=30)
    fn = jax.jit(fn)
    batch = crop_batch(1)
    losses, entropies, prototypes = [], [], []
    for _ in range(30):
      state, metrics = fn(state, batch)
      losses.append(float(metrics['loss']))
      entropies.append(float(metrics['teacher_entropy']))
      prototypes.append(int(metrics['teacher_prototypes']))
    log_k = np.log(64)
    self.assertLess(np.mean(losses[-5:]), 0.6 * losses[0])
    self.assertGreater(np.mean(entropies[-5:]), 0.05)  # not one-hot
    self.assertLess(np.mean(entropies[-5:]), 0.5 * log_k)  # not uniform
    self.assertGreater(prototypes[-1], 1)


if __name__ == '__main__':
  absltest.main()
