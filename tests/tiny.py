"""A tiny model config and synthetic batches shared by the tests."""

import jax
import jax.numpy as jnp

from dino_jax import config as config_lib


def tiny_config(batch_size: int = 16, out_dim: int = 64):
  c = config_lib.default_config()
  c.model.embed_dim = 32
  c.model.depth = 2
  c.model.num_heads = 2
  c.model.patch_size = 8
  c.model.img_size = 32
  c.model.out_dim = out_dim
  c.model.head_hidden_dim = 64
  c.model.head_bottleneck_dim = 16
  c.crops.global_size = 32
  c.crops.local_size = 16
  c.crops.local_number = 2
  c.batch_size = batch_size
  c.epochs = 2
  c.optim.warmup_epochs = 1
  return c


def crop_batch(seed: int, batch_size: int = 16, n_local: int = 2):
  """Distinct images (per-image colour offsets) and their crops."""
  k = jax.random.split(jax.random.key(seed), 3)
  base = 2.0 * jax.random.normal(k[0], (batch_size, 1, 1, 3))
  base = base + 0.5 * jax.random.normal(k[1], (batch_size, 32, 32, 3))
  noisy = base + 0.3 * jax.random.normal(k[2], base.shape)
  locals_ = [base[:, :16, :16], base[:, 16:, 16:], base[:, 8:24, 8:24]]
  return {
    'global_crops': jnp.stack([base, noisy]),
    'local_crops': jnp.stack(locals_[:n_local]),
  }
