"""The DINO optimizer against a torch-semantics numpy AdamW (SPEC §4)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from dino_jax import optim


def params_tree():
  return {
    'backbone': {
      'cls_token': jnp.full((1, 1, 3), 0.5),
      'pos_embed': jnp.full((1, 2, 3), -0.5),
      'norm': {'scale': jnp.ones(3), 'bias': jnp.zeros(3)},
      'fc': {'kernel': jnp.full((3, 3), 0.2), 'bias': jnp.full(3, 0.1)},
    },
    'head': {
      'last_layer': {
        'weight_v': jnp.full((3, 4), 0.3),
        'weight_g': jnp.ones((1, 4)),
      }
    },
  }


def grads_at(step, tree):
  """Deterministic, step-dependent gradients."""
  return jax.tree.map(
    lambda p: (
      jnp.sin(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) + step)
      * (1.0 + step)
    ),
    tree,
  )


class ReferenceAdamW:
  """torch.optim.AdamW for one tensor: own step count, decoupled decay."""

  def __init__(self, p, decay):
    self.p = np.asarray(p, np.float64)
    self.m = np.zeros_like(self.p)
    self.v = np.zeros_like(self.p)
    self.t = 0
    self.decay = decay

  def step(self, g, lr, wd):
    g = np.asarray(g, np.float64)
    self.t += 1
    if self.decay:
      self.p = self.p * (1 - lr * wd)
    self.m = 0.9 * self.m + 0.1 * g
    self.v = 0.999 * self.v + 0.001 * g * g
    m_hat = self.m / (1 - 0.9**self.t)
    v_hat = self.v / (1 - 0.999**self.t)
    self.p = self.p - lr * m_hat / (np.sqrt(v_hat) + 1e-8)


def clip_reference(g, max_norm):
  g = np.asarray(g, np.float64)
  coef = max_norm / (np.linalg.norm(g) + 1e-6)
  return g * coef if coef < 1 else g


class ClipTest(absltest.TestCase):
  def test_per_tensor_not_global(self):
    grads = {'big': jnp.array([3.0, 4.0]), 'small': jnp.array([0.3, 0.4])}
    tx = optim.clip_by_tensor_norm(3.0)
    out, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(
      out['big'], np.array([3.0, 4.0]) * 3 / (5 + 1e-6), rtol=1e-6
    )
    np.testing.assert_array_equal(out['small'], grads['small'])
    glob, _ = optax.clip_by_global_norm(3.0).update(grads, None)
    self.assertFalse(np.allclose(glob['small'], grads['small']))


class DecayMaskTest(absltest.TestCase):
  def test_rule(self):
    mask = optim.decay_mask(params_tree())
    self.assertTrue(mask['backbone']['cls_token'])
    self.assertTrue(mask['backbone']['pos_embed'])
    self.assertTrue(mask['backbone']['fc']['kernel'])
    self.assertTrue(mask['head']['last_layer']['weight_v'])
    self.assertTrue(mask['head']['last_layer']['weight_g'])
    self.assertFalse(mask['backbone']['fc']['bias'])
    self.assertFalse(mask['backbone']['norm']['scale'])
    self.assertFalse(mask['backbone']['norm']['bias'])


class DinoOptimizerTest(absltest.TestCase):
  def run_steps(self, n_steps, freeze_steps, clip):
    lr = np.linspace(0.0, 0.1, 8) + 0.01
    wd = np.linspace(0.04, 0.4, 8)
    tx = optim.make_optimizer(
      'adamw', lr, wd, clip_grad=clip, freeze_steps=freeze_steps
    )
    params = params_tree()
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = [params]
    for step in range(n_steps):
      updates, state = update(grads_at(step, params), state, params)
      params = optax.apply_updates(params, updates)
      history.append(params)
    return lr, wd, history, state

  def test_matches_reference_with_frozen_last_layer(self):
    freeze, n_steps, clip = 3, 7, 2.0
    lr, wd, history, state = self.run_steps(n_steps, freeze, clip)
    flat0, _ = jax.tree_util.tree_flatten_with_path(history[0])
    mask = jax.tree.leaves(optim.decay_mask(history[0]))
    refs = [ReferenceAdamW(p, m) for (_, p), m in zip(flat0, mask, strict=True)]
    names = [jax.tree_util.keystr(path) for path, _ in flat0]
    for step in range(n_steps):
      grads = jax.tree.leaves(grads_at(step, history[step]))
      for name, ref, g in zip(names, refs, grads, strict=True):
        if 'last_layer' in name and step < freeze:
          continue  # torch: grad None -> no update, no count, no decay
        ref.step(clip_reference(g, clip), lr[step], wd[step])
    final = jax.tree.leaves(history[-1])
    for name, ref, got in zip(names, refs, final, strict=True):
      np.testing.assert_allclose(got, ref.p, rtol=1e-4, atol=2e-6, err_msg=name)
    # The frozen layer is bit-identical through the freeze, then moves.
    for step in range(freeze + 1):
      np.testing.assert_array_equal(
        history[step]['head']['last_layer']['weight_v'],
        history[0]['head']['last_layer']['weight_v'],
      )
    self.assertFalse(
      np.allclose(
        history[freeze + 1]['head']['last_layer']['weight_v'],
        history[0]['head']['last_layer']['weight_v'],
      )
    )
    self.assertAlmostEqual(
      float(state.hyperparams['learning_rate']), lr[n_steps - 1], places=6
    )

  def test_sgd_closed_form(self):
    lr, wd = np.full(4, 0.1), np.full(4, 0.5)
    tx = optim.make_optimizer('sgd', lr, wd, clip_grad=0, freeze_steps=0)
    p = {'w': jnp.array([[2.0]])}
    state = tx.init(p)
    g = {'w': jnp.array([[1.0]])}
    u1, state = tx.update(g, state, p)
    p1 = optax.apply_updates(p, u1)
    # buf = g + wd p = 2; p1 = 2 - 0.1 * 2 = 1.8
    np.testing.assert_allclose(p1['w'], [[1.8]], rtol=1e-6)
    u2, _ = tx.update(g, state, p1)
    # buf = 0.9 * 2 + (1 + 0.5 * 1.8) = 3.7; p2 = 1.8 - 0.37
    np.testing.assert_allclose(
      optax.apply_updates(p1, u2)['w'], [[1.43]], rtol=1e-6
    )

  def test_unknown_optimizer(self):
    with self.assertRaisesRegex(ValueError, "'lamb' unknown"):
      optim.make_optimizer(
        'lamb', np.ones(2), np.ones(2), clip_grad=0, freeze_steps=0
      )


if __name__ == '__main__':
  absltest.main()
