"""ViT and DINO head: counts, init, forward vs a numpy reference (SPEC §2)."""

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import reference
from absl.testing import absltest, parameterized

from dino_jax import models

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32)


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def tiny_vit(**kw):
  return models.VisionTransformer(**{**TINY, **kw})


class PrecisionPinTest(absltest.TestCase):
  def test_float32_matmuls_run_at_highest_precision(self):
    # tests/conftest.py pins it so that the float32 parity tolerances also
    # hold on a GPU, whose default would be TF32.
    self.assertEqual(jax.config.jax_default_matmul_precision, 'highest')
    x = jnp.ones((4, 4), jnp.float32)
    self.assertIn('HIGHEST', jax.jit(jnp.dot).lower(x, x).as_text())


class ParamCountTest(parameterized.TestCase):
  @parameterized.parameters(
    ('vit_tiny', 16, 5_524_416),
    ('vit_small', 16, 21_665_664),
    ('vit_small', 8, 21_670_272),
    ('vit_base', 16, 85_798_656),
    ('vit_base', 8, 85_807_872),
  )
  def test_backbone(self, arch, patch, expected):
    model = getattr(models, arch)(patch_size=patch)
    shapes = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3))
    )
    self.assertEqual(count(shapes), expected)

  @parameterized.parameters(
    (384, 22_352_128), (192, 21_958_912), (768, 23_138_560)
  )
  def test_head(self, dim, expected):
    x = jnp.zeros((1, dim))
    trainable = models.DINOHead(65536, norm_last_layer=False)
    frozen = models.DINOHead(65536)
    self.assertEqual(
      count(jax.eval_shape(trainable.init, jax.random.key(0), x)), expected
    )
    # With norm_last_layer, g is fixed at 1 and not a parameter.
    self.assertEqual(
      count(jax.eval_shape(frozen.init, jax.random.key(0), x)),
      expected - 65536,
    )


class InitTest(absltest.TestCase):
  def test_vit_small_init_distributions(self):
    params = models.vit_small().init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3))
    )['params']
    qkv = np.asarray(params['blocks_0']['attn']['qkv']['kernel'])
    self.assertAlmostEqual(qkv.std(), 0.02, delta=0.0005)
    # Effectively untruncated: values beyond 2 sigma exist (Flax's
    # truncated_normal would cut there).
    self.assertGreater(np.abs(qkv).max(), 4 * 0.02)
    np.testing.assert_array_equal(params['blocks_0']['attn']['qkv']['bias'], 0)
    np.testing.assert_array_equal(params['norm']['scale'], 1)
    self.assertAlmostEqual(
      float(np.std(params['pos_embed'])), 0.02, delta=0.001
    )
    bound = 1 / np.sqrt(3 * 16 * 16)  # 0.03608 (SPEC §2.3)
    conv = np.asarray(params['patch_embed']['kernel'])
    self.assertLessEqual(np.abs(conv).max(), bound)
    self.assertGreater(np.abs(conv).max(), 0.99 * bound)
    self.assertAlmostEqual(conv.std(), bound / np.sqrt(3), delta=1e-3)

  def test_head_last_layer_init(self):
    params = models.DINOHead(4096, norm_last_layer=False).init(
      jax.random.key(0), jnp.zeros((1, 384))
    )['params']
    v = np.asarray(params['last_layer']['weight_v'])
    chex.assert_shape(v, (256, 4096))
    self.assertLessEqual(np.abs(v).max(), 1 / 16)
    self.assertGreater(np.abs(v).max(), 0.99 / 16)
    np.testing.assert_array_equal(params['last_layer']['weight_g'], 1)


class PosEmbedTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.pos = jax.random.normal(jax.random.key(0), (1, 197, 16)) * 0.05

  def test_identity_at_native_size(self):
    out = models.interpolate_pos_embed(self.pos, 14, 14, 224, 224)
    np.testing.assert_array_equal(out, self.pos)

  @parameterized.parameters(
    (6, 6, 96, 96),
    (14, 10, 224, 160),
    (30, 30, 480, 480),
    (7, 28, 112, 448),  # npatch == N but not square: interpolated
    (14, 14, 224, 225),  # same grid, non-square pixels: interpolated
  )
  def test_matches_spec_rule(self, gh, gw, height, width):
    out = models.interpolate_pos_embed(self.pos, gh, gw, height, width)
    ref = reference.interpolate_pos_embed(self.pos, gh, gw, height, width)
    chex.assert_shape(out, (1, 1 + gh * gw, 16))
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=2e-6 * scale)

  def test_not_identity_when_forced(self):
    ref = reference.interpolate_pos_embed(self.pos, 14, 14, 224, 225)
    self.assertGreater(np.abs(ref - np.asarray(self.pos)).max(), 1e-3)


class PatchEmbedTest(parameterized.TestCase):
  @parameterized.parameters((32, 32), (35, 29))
  def test_equals_strided_conv(self, height, width):
    """Matmul patches == PyTorch-style VALID stride-p conv, values and grads."""
    from dino_jax.models import vit

    init = vit._torch_default_uniform(0.2)
    embed = vit.PatchEmbed(16, 8, kernel_init=init, bias_init=init)
    conv = flax.linen.Conv(16, (8, 8), strides=(8, 8), padding='VALID')
    images = jax.random.normal(jax.random.key(0), (2, height, width, 3))
    params = embed.init(jax.random.key(1), images)
    self.assertEqual(
      jax.tree.map(jnp.shape, params),
      jax.tree.map(jnp.shape, conv.init(jax.random.key(1), images)),
    )
    out = embed.apply(params, images)
    chex.assert_shape(out, (2, height // 8, width // 8, 16))
    np.testing.assert_allclose(
      out, conv.apply(params, images), atol=1e-5, rtol=1e-5
    )

    def grads(module):
      fn = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))  # noqa: E731
      return jax.grad(fn, argnums=(0, 1))(params, images)

    chex.assert_trees_all_close(grads(embed), grads(conv), atol=1e-5)


class ViTForwardTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.model = tiny_vit()
    self.variables = self.model.init(
      jax.random.key(1), jnp.zeros((1, 32, 32, 3))
    )

  @parameterized.parameters((32, 32), (16, 16), (40, 24), (16, 64))
  def test_matches_reference(self, height, width):
    images = jax.random.normal(jax.random.key(2), (2, height, width, 3))
    tokens = self.model.apply(self.variables, images, method='features')
    ref = reference.vit_tokens(self.variables['params'], images, 8, 2)
    np.testing.assert_allclose(tokens, ref, atol=2e-5, rtol=1e-5)
    cls = self.model.apply(self.variables, images)
    chex.assert_shape(cls, (2, 32))
    chex.assert_type(cls, jnp.float32)
    np.testing.assert_allclose(cls, ref[:, 0], atol=2e-5, rtol=1e-5)

  def test_last_self_attention(self):
    images = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    attn = self.model.apply(
      self.variables, images, method='last_self_attention'
    )
    chex.assert_shape(attn, (2, 2, 17, 17))
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)
    ref = reference.vit_tokens(
      self.variables['params'], images, 8, 2, return_attention=True
    )
    np.testing.assert_allclose(attn, ref, atol=1e-6)

  def test_intermediate_layers(self):
    images = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    layers = self.model.apply(
      self.variables, images, n=2, method='intermediate_layers'
    )
    self.assertLen(layers, 2)
    for layer in layers:
      chex.assert_shape(layer, (2, 17, 32))
    features = self.model.apply(self.variables, images, method='features')
    np.testing.assert_array_equal(layers[-1], features)
    # The earlier layer is normed too: zero mean over D for each token.
    np.testing.assert_allclose(layers[0].mean(-1), 0.0, atol=1e-5)

  def test_fused_attention_same_numbers(self):
    images = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
    fused = tiny_vit(attention='fused')
    np.testing.assert_allclose(
      fused.apply(self.variables, images),
      self.model.apply(self.variables, images),
      atol=1e-5,
    )

  def test_remat_same_gradients(self):
    images = jax.random.normal(jax.random.key(6), (2, 32, 32, 3))

    def value_and_grads(model):
      def f(p):
        out = model.apply(
          {'params': p}, images, True, rngs={'drop_path': jax.random.key(0)}
        )
        return jnp.sum(out**2)

      return jax.value_and_grad(f)(self.variables['params'])

    value, grads = value_and_grads(tiny_vit(remat=True, drop_path_rate=0.2))
    ref_value, ref_grads = value_and_grads(tiny_vit(drop_path_rate=0.2))
    self.assertEqual(float(value), float(ref_value))  # same drop-path masks
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-4, atol=1e-5)

  def test_drop_path_rates_and_masks(self):
    model = tiny_vit(depth=4, drop_path_rate=0.3)
    bound = model.bind(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    rates = [block.drop_path for block in bound.blocks]
    np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3], atol=1e-12)
    x = jnp.ones((4000, 1, 2))
    dp = models.vit.DropPath(0.25)
    out = dp.apply({}, x, True, rngs={'drop_path': jax.random.key(1)})
    values = np.unique(np.asarray(out))
    np.testing.assert_allclose(values, [0.0, 1 / 0.75], rtol=1e-6)
    kept = float(np.mean(np.asarray(out)[:, 0, 0] > 0))
    self.assertAlmostEqual(kept, 0.75, delta=0.03)
    np.testing.assert_array_equal(dp.apply({}, x, False), x)

  def test_inference_is_deterministic_without_rngs(self):
    model = tiny_vit(drop_path_rate=0.5)
    images = jax.random.normal(jax.random.key(7), (2, 32, 32, 3))
    a = model.apply(self.variables, images)
    np.testing.assert_array_equal(a, self.model.apply(self.variables, images))


class HeadTest(parameterized.TestCase):
  @parameterized.parameters(True, False)
  def test_matches_reference(self, norm_last_layer):
    head = models.DINOHead(
      64, norm_last_layer=norm_last_layer, hidden_dim=48, bottleneck_dim=16
    )
    x = jax.random.normal(jax.random.key(0), (5, 32))
    variables = head.init(jax.random.key(1), x)
    if not norm_last_layer:
      g = 0.5 + jax.random.uniform(jax.random.key(2), (1, 64))
      variables['params']['last_layer']['weight_g'] = g
    out = head.apply(variables, x)
    chex.assert_shape(out, (5, 64))
    ref = reference.dino_head(variables['params'], x)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    if norm_last_layer:  # cosines of unit vectors
      self.assertLessEqual(float(jnp.abs(out).max()), 1.0 + 1e-6)

  def test_bn_and_single_layer_names(self):
    x = jnp.ones((4, 8))
    bn = models.DINOHead(10, use_bn=True, hidden_dim=6, bottleneck_dim=4)
    names = set(bn.init(jax.random.key(0), x)['params'])
    self.assertEqual(
      names, {'mlp_0', 'mlp_1', 'mlp_3', 'mlp_4', 'mlp_6', 'last_layer'}
    )
    single = models.DINOHead(10, nlayers=1, bottleneck_dim=4)
    self.assertEqual(
      set(single.init(jax.random.key(0), x)['params']),
      {'mlp_0', 'last_layer'},
    )


if __name__ == '__main__':
  absltest.main()
