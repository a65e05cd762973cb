"""The levers of docs/bytes.md compute what the default model computes.

Each lever changes how the student's loss and gradients are computed (a
remat policy, the Pallas flash attention kernel), not what: on the tiny
config, in float32 on this CPU, the loss and every gradient match those of
the default settings to float tolerance; the kernel, padded and masked, runs
in Pallas's TPU interpret mode against the softmax attention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import crop_batch, tiny_config

from dino_jax import config as config_lib
from dino_jax import loss as loss_lib
from dino_jax import step as step_lib
from dino_jax.models import vit


def loss_and_grads(config, batch):
  """The student's DINO loss against fixed teacher outputs, and its grads."""
  student, _ = step_lib.build_models(config, backend='cpu')
  params = student.init(
    jax.random.key(0), batch['global_crops'], batch['local_crops']
  )['params']
  k = config.model.out_dim
  b = batch['global_crops'].shape[1]
  teacher_out = 3.0 * jax.random.normal(jax.random.key(1), (2, b, k))

  def loss_fn(p):
    out = student.apply(
      {'params': p},
      batch['global_crops'],
      batch['local_crops'],
      True,
      rngs={'drop_path': jax.random.key(2)},
    )
    return loss_lib.dino_loss(
      out, teacher_out, jnp.zeros((k,)), teacher_temp=0.04
    )

  return jax.jit(jax.value_and_grad(loss_fn))(params)


def assert_same(got, want, rtol, atol):
  np.testing.assert_allclose(got[0], want[0], rtol=rtol, atol=atol)
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want[1])[0])
  for path, g in jax.tree_util.tree_flatten_with_path(got[1])[0]:
    np.testing.assert_allclose(
      g, flat_want[path], rtol=rtol, atol=atol, err_msg=str(path)
    )


def tiny(**model):
  config = tiny_config(batch_size=4)
  config.model.drop_path_rate = 0.1
  config.model.update(model)
  return config


@pytest.fixture(scope='module')
def batch():
  return crop_batch(0, batch_size=4)


@pytest.fixture(scope='module')
def default(batch):
  """The default settings' loss and gradients (float32, einsum)."""
  return loss_and_grads(tiny(), batch)


@pytest.mark.parametrize('policy', ['nothing', 'dots', 'dots_no_batch'])
def test_remat_policy_keeps_loss_and_grads(default, batch, policy):
  got = loss_and_grads(tiny(remat=True, remat_policy=policy), batch)
  assert_same(got, default, rtol=1e-4, atol=1e-5)


def test_remat_policy_in_scanned_blocks(batch):
  want = loss_and_grads(tiny(scan_blocks=True), batch)
  config = tiny(remat=True, remat_policy='dots_no_batch', scan_blocks=True)
  assert_same(loss_and_grads(config, batch), want, rtol=1e-4, atol=1e-5)


def test_flash_attention_matches_softmax_attention():
  """The Pallas kernel (TPU interpret mode), padded and masked, vs einsum."""
  from jax.experimental.pallas import tpu as pltpu

  ks = jax.random.split(jax.random.key(3), 3)
  # T = 5: one 128 tile, 123 padded keys that must get no weight.
  q, k, v = (jax.random.normal(x, (2, 2, 5, 8)) for x in ks)

  def reference(q, k, v):
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k) * 0.125
    return jnp.einsum('bhqk,bhkd->bhqd', jax.nn.softmax(logits, -1), v)

  def scalar(fn):
    return lambda *a: jnp.sum(jnp.sin(fn(*a)))

  want = reference(q, k, v)
  want_grads = jax.grad(scalar(reference), (0, 1, 2))(q, k, v)
  flash = lambda q, k, v: vit.flash_attention(q, k, v, 0.125)  # noqa: E731
  with pltpu.force_tpu_interpret_mode():
    got = flash(q, k, v)
    grads = jax.grad(scalar(flash), (0, 1, 2))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for g, w in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_unknown_remat_policy_is_named():
  config = tiny(remat=True, remat_policy='everything')
  with pytest.raises(config_lib.ConfigError, match="remat_policy='everything'"):
    config_lib.validate(config)


def test_flash_attention_is_for_tpus():
  model = tiny(attention='flash').model
  assert config_lib.resolve_compute(model, 'tpu') == ('float32', 'flash')
  with pytest.raises(config_lib.ConfigError, match="'flash' is a TPU kernel"):
    config_lib.resolve_compute(model, 'gpu')
