"""The analytic FLOP counts against XLA:CPU's cost analysis."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest

from dino_jax import config as config_lib
from dino_jax import flops
from dino_jax import step as step_lib
from dino_jax.models import DINOHead, VisionTransformer


def xla_flops(fn, *args) -> float:
  """FLOPs of ``fn(*args)`` from the compiled executable (CPU: exact)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost['flops'])


def small_config() -> ml_collections.ConfigDict:
  """Wide enough (D 256) that matmuls dominate, as in the real models."""
  c = config_lib.default_config()
  c.batch_size = 32  # the optimizer's elementwise work is per step
  c.model.patch_size = 8
  c.model.img_size = 32
  c.model.embed_dim = 256
  c.model.depth = 2
  c.model.num_heads = 4
  c.model.out_dim = 512
  c.model.head_hidden_dim = 512
  c.model.head_bottleneck_dim = 256  # official; the softmax over K is per row
  c.crops.global_size = 32
  c.crops.local_size = 16
  c.crops.local_number = 2
  return c


class ClosedFormTest(absltest.TestCase):
  def test_vit_s16_global_crop_is_4_6_gmacs(self):
    # ViT-S/16 at 224 px is quoted as 4.6 GMACs (DeiT-S, timm): 9.2 GFLOPs.
    vit = flops.vit_forward_flops(224, 16, 384, 12)
    self.assertEqual(vit['patch_embed'], 2 * 196 * 768 * 384)
    block = 2 * 197 * 384 * (3 + 1 + 4 + 4) * 384 + 2 * 2 * 197 * 197 * 384
    self.assertEqual(vit['blocks'], 12 * block)
    self.assertAlmostEqual(sum(vit.values()) / 2e9, 4.6, delta=0.02)

  def test_head_layers(self):
    self.assertEqual(
      flops.head_forward_flops(384, 65536, 2048, 256, 3),
      2 * (384 * 2048 + 2048 * 2048 + 2048 * 256 + 256 * 65536),
    )
    self.assertEqual(
      flops.head_forward_flops(384, 100, 2048, 256, 1),
      2 * (384 * 256 + 256 * 100),
    )

  def test_step_is_three_student_forwards_and_one_teacher(self):
    c = config_lib.default_config()
    count = flops.from_config(c, batch=8)
    g, local = count['global_crop_forward'], count['local_crop_forward']
    embed_g = flops.vit_forward_flops(224, 16, 384, 12)['patch_embed']
    embed_l = flops.vit_forward_flops(96, 16, 384, 12)['patch_embed']
    # The student's patch embedding has no input gradient: 2x its forward,
    # not 3x. Only the tiny weight-norm and loss terms are left over.
    rest = count['per_image'] - (
      3 * (2 * g + 8 * local) - (2 * embed_g + 8 * embed_l) + 2 * g
    )
    self.assertGreater(rest, 0)
    self.assertLess(rest / count['per_image'], 1e-3)
    self.assertAlmostEqual(
      count['per_image'] / 1e9, 113.445, delta=0.005
    )  # batch 8
    self.assertEqual(count['step'], 8 * count['per_image'])

  def test_remat_is_not_counted(self):
    c = config_lib.default_config()
    base = flops.from_config(c, batch=2)
    c.model.remat = True  # model FLOPs, not hardware FLOPs
    self.assertEqual(flops.from_config(c, batch=2), base)


class AgainstXlaTest(absltest.TestCase):
  """Elementwise work is not counted: XLA must be at most 5 % above."""

  def assert_close(self, analytic, xla):
    self.assertGreaterEqual(xla, analytic * 0.999)  # nothing counted twice
    self.assertLess(abs(xla / analytic - 1), 0.05, (analytic, xla))

  def test_vit_forward(self):
    model = VisionTransformer(
      patch_size=8, embed_dim=128, depth=2, num_heads=2, img_size=32
    )
    images = jnp.zeros((4, 32, 32, 3))
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    xla = xla_flops(model.apply, params, images)
    vit = flops.vit_forward_flops(32, 8, 128, 2)
    self.assert_close(4 * sum(vit.values()), xla)

  def test_head_forward(self):
    head = DINOHead(out_dim=4096, hidden_dim=512, bottleneck_dim=128)
    x = jnp.zeros((16, 128))
    params = jax.eval_shape(head.init, jax.random.PRNGKey(0), x)
    xla = xla_flops(head.apply, params, x)
    # 16 rows plus one weight-norm column sum per call.
    analytic = 16 * flops.head_forward_flops(128, 4096, 512, 128, 3)
    self.assert_close(analytic + 2 * 128 * 4096, xla)

  def test_train_step(self):
    c = small_config()
    sched = step_lib.Schedules.from_config(c, 10)
    student, teacher = step_lib.build_models(c)
    tx = step_lib.build_optimizer(c, sched)
    state = jax.eval_shape(step_lib.init_fn_for(c, student, tx))
    batch = {
      'global_crops': jax.ShapeDtypeStruct((2, 32, 32, 32, 3), np.float32),
      'local_crops': jax.ShapeDtypeStruct((2, 32, 16, 16, 3), np.float32),
    }
    fn = step_lib.make_train_step(student, teacher, tx, sched)
    xla = xla_flops(fn, state, batch)
    self.assert_close(flops.from_config(c)['step'], xla)


if __name__ == '__main__':
  absltest.main()
