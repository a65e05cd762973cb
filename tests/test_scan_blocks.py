"""model.scan_blocks: the scanned ViT computes what the unrolled one does.

The references are the unrolled model (the default, itself checked against
PyTorch in test_interop) with the same weights stacked, and the PyTorch ViT
of tests/torch_dino.py for the interop round trip.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_dino
from absl.testing import absltest
from jax.sharding import PartitionSpec as P
from tiny import crop_batch, tiny_config

from dino_jax import checkpoint as checkpoint_lib
from dino_jax import config as config_lib
from dino_jax import interop, optim, parallel
from dino_jax import step as step_lib
from dino_jax.models import vit

TINY = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2, img_size=32)


def max_diff(a, b) -> float:
  return max(
    float(jnp.max(jnp.abs(x - y)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def assert_trees_close(test, a, b, atol, rtol=0.0):
  """Every leaf within atol + rtol * (the largest magnitude of b's)."""
  test.assertEqual(jax.tree.structure(a), jax.tree.structure(b))
  scale = max(float(jnp.max(jnp.abs(y))) for y in jax.tree.leaves(b))
  test.assertLess(max_diff(a, b), atol + rtol * scale)


class ForwardTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.unrolled = vit.VisionTransformer(drop_path_rate=0.3, **TINY)
    cls.scanned = cls.unrolled.clone(scan_blocks=True)
    cls.x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    cls.variables = cls.unrolled.init(jax.random.key(1), cls.x)
    cls.stacked = vit.stack_blocks(cls.variables)

  def apply(self, *args, method, **kwargs):
    a = self.unrolled.apply(self.variables, *args, method=method, **kwargs)
    b = self.scanned.apply(self.stacked, *args, method=method, **kwargs)
    return a, b

  def test_layout(self):
    params = self.stacked['params']
    self.assertNotIn('blocks_0', params)
    self.assertEqual(
      params['blocks']['attn']['qkv']['kernel'].shape, (3, 32, 96)
    )
    self.assertEqual(params['blocks']['norm1']['scale'].shape, (3, 32))
    # The scanned model initializes the same tree.
    shapes = jax.eval_shape(self.scanned.init, jax.random.key(1), self.x)
    self.assertEqual(
      jax.tree.map(jnp.shape, shapes), jax.tree.map(jnp.shape, self.stacked)
    )
    back = vit.unstack_blocks(self.stacked)
    jax.tree.map(np.testing.assert_array_equal, back, self.variables)
    with self.assertRaisesRegex(ValueError, 'not 0 ... 1'):
      vit.stack_blocks({'blocks_0': {'w': 1.0}, 'blocks_2': {'w': 2.0}})

  def test_tokens(self):
    """CLS and patch tokens after the final norm, evaluation mode."""
    a, b = self.apply(self.x, method='features')
    self.assertEqual(a.shape, (4, 17, 32))
    self.assertLess(max_diff(a, b), 1e-6)

  def test_drop_path(self):
    """Each layer's rate and keys as the unrolled blocks draw them."""
    rngs = {'drop_path': jax.random.key(7)}
    a, b = self.apply(self.x, True, method='features', rngs=rngs)
    self.assertLess(max_diff(a, b), 1e-6)
    evaluated = self.unrolled.apply(self.variables, self.x, method='features')
    self.assertGreater(max_diff(a, evaluated), 1e-2)  # drop path did drop

  def test_last_self_attention(self):
    a, b = self.apply(self.x, method='last_self_attention')
    self.assertEqual(a.shape, (4, 2, 17, 17))
    self.assertLess(max_diff(a, b), 1e-6)

  def test_intermediate_layers(self):
    a, b = self.apply(self.x, 2, method='intermediate_layers')
    self.assertLen(b, 2)
    self.assertLess(max_diff(a, b), 1e-6)

  def test_remat_gradients(self):
    """model.remat with a scan: the gradients of the unrolled blocks."""
    rngs = {'drop_path': jax.random.key(3)}

    def grads(model, variables):
      def loss(params):
        out = model.apply({'params': params}, self.x, True, rngs=rngs)
        return jnp.sum(jnp.sin(out))

      return jax.grad(loss)(variables['params'])

    a = grads(self.unrolled.clone(remat=True), self.variables)
    b = grads(self.scanned.clone(remat=True), self.stacked)
    assert_trees_close(self, vit.stack_blocks(a), b, 0.0, rtol=1e-6)


class OptimizerTest(absltest.TestCase):
  """Per-tensor rules (clip, weight decay mask, LARS) per layer."""

  def test_updates_equal_unrolled(self):
    model = vit.VisionTransformer(**TINY)
    x = jnp.zeros((1, 32, 32, 3))
    params = {'backbone': model.init(jax.random.key(0), x)['params']}
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    # Layer-dependent gradient sizes: one norm over the stack would clip
    # and scale the layers differently from one norm per layer.
    grads = jax.tree.unflatten(
      treedef,
      [
        jax.random.normal(k, p.shape) * (1 + 10 * i % 7)
        for i, (k, p) in enumerate(zip(keys, leaves, strict=True))
      ],
    )
    schedule = np.full(10, 0.1)
    for name in ('adamw', 'lars'):
      tx = optim.make_optimizer(
        name, schedule, schedule, clip_grad=0.5, freeze_steps=0
      )
      update = jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p)[0])
      want = update(grads, params)
      got = update(vit.stack_blocks(grads), vit.stack_blocks(params))
      assert_trees_close(self, vit.stack_blocks(want), got, 1e-7)

  def test_decay_mask(self):
    model = vit.VisionTransformer(**TINY)
    stacked = vit.stack_blocks(
      model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
    )
    mask = optim.decay_mask(stacked)['blocks']
    self.assertFalse(mask['norm1']['scale'])  # [L, D]: a norm, not decayed
    self.assertFalse(mask['attn']['qkv']['bias'])
    self.assertTrue(mask['attn']['qkv']['kernel'])


class StepTest(absltest.TestCase):
  @pytest.mark.slow  # two tiny train steps compiled: ~25 s of one core
  def test_train_steps_equal_unrolled(self):
    """Three steps, drop path 0.3 and clipping on: same losses and params."""
    config = tiny_config()
    config.model.drop_path_rate = 0.3
    config.optim.clip_grad = 0.3
    sched = step_lib.Schedules.from_config(config, 5)
    batch = crop_batch(0)
    results = []
    for scan in (False, True):
      config.model.scan_blocks = scan
      student, teacher = step_lib.build_models(config)
      tx = step_lib.build_optimizer(config, sched)
      model = student.clone(backbone=student.backbone.clone(scan_blocks=False))
      state = step_lib.init_state(jax.random.key(0), model, tx, 32, 64)
      if scan:  # the unrolled model's initial weights, stacked
        student_params = vit.stack_blocks(state.student)
        state = state.replace(
          student=student_params,
          teacher=vit.stack_blocks(state.teacher),
          opt_state=tx.init(student_params),
        )
      fn = jax.jit(step_lib.make_train_step(student, teacher, tx, sched))
      losses = []
      for _ in range(3):
        state, metrics = fn(state, batch)
        losses.append(float(metrics['loss']))
      results.append((losses, state))
    (want_losses, want), (got_losses, got) = results
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-6)
    for name in ('student', 'teacher'):
      assert_trees_close(
        self, vit.unstack_blocks(getattr(got, name)), getattr(want, name), 1e-6
      )


class InteropTest(absltest.TestCase):
  def test_round_trip_with_torch(self):
    torch.manual_seed(0)
    reference = torch_dino.ViT(patch=8, dim=32, depth=3, heads=2, img_size=32)
    reference.eval()
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    model = vit.VisionTransformer(scan_blocks=True, **TINY)
    variables = interop.from_pytorch(state, model)
    qkv = variables['params']['blocks']['attn']['qkv']['kernel']
    np.testing.assert_array_equal(qkv[2], state['blocks.2.attn.qkv.weight'].T)
    x = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
    with torch.no_grad():
      xt = torch.from_numpy(x).permute(0, 3, 1, 2)
      want_cls = reference(xt).numpy()
      want_attn = reference.last_self_attention(xt).numpy()
    np.testing.assert_allclose(
      model.apply(variables, x), want_cls, atol=1e-5, rtol=1e-5
    )
    attention = model.apply(variables, x, method='last_self_attention')
    np.testing.assert_allclose(attention, want_attn, atol=1e-6, rtol=1e-5)
    exported = interop.to_pytorch(variables, model)
    self.assertEqual(set(exported), set(state))
    for key, value in state.items():
      np.testing.assert_array_equal(exported[key], value, key)


class ShardingTest(absltest.TestCase):
  def test_leaf_spec_never_splits_layers(self):
    # ViT-S fc1 kernels of 12 layers: split as each layer's.
    self.assertEqual(
      parallel.leaf_spec((12, 384, 1536), 4, 2**18, stacked=True),
      P(None, None, 'fsdp'),
    )
    self.assertEqual(parallel.leaf_spec((384, 1536), 4, 2**18), P(None, 'fsdp'))
    # The layers axis is the largest divisible one: still not split.
    self.assertEqual(
      parallel.leaf_spec((16, 8, 6), 4, 1, stacked=True),
      P(None, 'fsdp', None),
    )
    # Each layer's size decides (proj: 147,456 < 2**18), as unrolled.
    self.assertEqual(
      parallel.leaf_spec((12, 384, 384), 4, 2**18, stacked=True), P()
    )

  def test_state_sharding(self):
    config = tiny_config()
    config.model.scan_blocks = True
    _, _, init_fn = step_lib.state_template(config)
    shape = jax.eval_shape(init_fn)
    mesh = parallel.make_mesh(4, 2)
    shardings = parallel.state_sharding(mesh, shape, fsdp_min_size=64)
    split = []

    def check(path, sharding):
      spec = tuple(sharding.spec)
      if parallel.is_stacked(path) and 'fsdp' in spec:
        self.assertIsNone(spec[0], jax.tree_util.keystr(path))
        split.append(path)

    jax.tree_util.tree_map_with_path(check, shardings)
    self.assertNotEmpty(split)  # kernels, and their Adam moments


class HloInstructionsTest(absltest.TestCase):
  def test_counts_every_computation(self):
    """aot's instruction count: fusion and loop bodies too, each once."""
    from dino_jax.aot import hlo

    text = """HloModule m, entry_computation_layout={(f32[2]{0})->f32[2]{0}}

%fused (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %s = f32[2]{0} sine(%p)
}

ENTRY %main (x: f32[2]) -> f32[2] {
  %x = f32[2]{0} parameter(0), metadata={op_name="x = y"}
  ROOT %f = f32[2]{0} fusion(%x), kind=kLoop, calls=%fused
}
"""
    self.assertEqual(hlo.hlo_instructions(text), 4)


class ConfigTest(absltest.TestCase):
  def test_resnet_refused(self):
    config = tiny_config()
    config.model.arch = 'resnet18'
    config.model.scan_blocks = True
    with self.assertRaisesRegex(config_lib.ConfigError, 'model.scan_blocks'):
      config_lib.validate(config)

  def test_resume_with_the_other_layout_is_refused(self):
    config = tiny_config()
    saved = config.to_dict()
    config.model.scan_blocks = True
    with self.assertRaisesRegex(
      checkpoint_lib.IncompatibleCheckpointError,
      r'model.scan_blocks \(checkpoint False, now True\)',
    ):
      checkpoint_lib.check_compatible(saved, config, '/w')


if __name__ == '__main__':
  absltest.main()
