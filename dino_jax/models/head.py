"""DINO projection head (SPEC §2.5) and the multi-crop student/teacher model.

Head parameter layout (Flax names; PyTorch names in brackets): ``mlp_{i}``
[mlp.{i}] with the torch indices (0, 2, 4 without batch norm; 0, 1 (BN), 3,
4 (BN), 6 with it), ``last_layer/weight_v`` [last_layer.weight_v, transposed
to [bottleneck, K]] and, when the norm is trainable, ``last_layer/weight_g``
[last_layer.weight_g, stored as [1, K]]; without weight norm (the released
ResNet-50 head) ``last_layer/kernel`` [last_layer.weight, transposed].
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dino_jax import parallel
from dino_jax.models import resnet, vit

_TRUNC_NORMAL = nn.initializers.normal(0.02)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||_2, eps) over the last axis (``F.normalize``)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


class WeightNormLinear(nn.Module):
  """Linear layer without bias, W[:, k] = g[k] * v[:, k] / ||v[:, k]||.

  With ``trainable_norm=False`` (``norm_last_layer``) g is fixed at 1 and not
  a parameter, so the optimizer never sees it (SPEC §2.5).
  """

  features: int
  trainable_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_dim = x.shape[-1]
    # SPEC §2.3: weight_v keeps nn.Linear's default U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1.0 / math.sqrt(in_dim)
    v = self.param(
      'weight_v',
      lambda key, shape: jax.random.uniform(
        key, shape, jnp.float32, -bound, bound
      ),
      (in_dim, self.features),
    )
    # No eps in the weight norm (torch weight_norm). x @ (v * s) is computed
    # as (x @ v) * s: on XLA:CPU a dot whose operand is an elementwise fusion
    # falls off the fast matmul path (9 s instead of 0.03 s for K = 65536),
    # and the column sums of squares as a matmul with ones avoid XLA:CPU's
    # slow non-minor reduction (45 ms instead of 200 ms).
    sum_sq = jnp.dot(
      jnp.ones((1, in_dim), jnp.float32),
      jnp.square(v),
      precision=jax.lax.Precision.HIGHEST,
    )
    scale = jax.lax.rsqrt(sum_sq)  # [1, K]
    if self.trainable_norm:
      g = self.param('weight_g', nn.initializers.ones, (1, self.features))
      scale = scale * g
    out = jnp.dot(x.astype(self.dtype), v.astype(self.dtype))
    return out * scale.astype(self.dtype)


class DINOHead(nn.Module):
  """MLP -> l2-normalize -> weight-normalized linear to ``out_dim`` (SPEC §2.5).

  Attributes:
    out_dim: K, the number of prototypes.
    use_bn: batch norm after each hidden linear layer.
    norm_last_layer: fix the last layer's weight norm g at 1.
    weight_norm: False: the last layer is a plain linear map without bias
      (the released ResNet-50 full checkpoint's head); ``norm_last_layer``
      does not apply to it.
    nlayers: MLP depth (1 = a single linear to the bottleneck).
    hidden_dim: MLP hidden width.
    bottleneck_dim: width before the last layer.
    dtype: compute dtype.
    axis_name: mesh axes the BatchNorm statistics average over (inside a
      ``shard_map`` over the batch), or None.
  """

  out_dim: int
  use_bn: bool = False
  norm_last_layer: bool = True
  weight_norm: bool = True
  nlayers: int = 3
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  dtype: Any = jnp.float32
  axis_name: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: [B, D] -> [B, out_dim]."""
    dense = functools.partial(
      nn.Dense, kernel_init=_TRUNC_NORMAL, dtype=self.dtype
    )
    if self.nlayers == 1:
      x = dense(self.bottleneck_dim, name='mlp_0')(x)
    else:
      index = 0  # torch nn.Sequential index, for the parameter names
      for _ in range(self.nlayers - 1):
        x = dense(self.hidden_dim, name=f'mlp_{index}')(x)
        index += 1
        if self.use_bn:
          # torch BatchNorm1d (momentum 0.1, eps 1e-5, unbiased running
          # variance) over every row: the batch and crop axes together.
          x = resnet.BatchNorm(axis_name=self.axis_name, name=f'mlp_{index}')(
            x, train
          )
          index += 1
        x = vit.gelu(x)  # exact erf GELU
        # Rows stay on their devices: the fsdp-split weights are gathered
        # instead (else GSPMD may gather the rows, tensor-parallel).
        x = parallel.constrain_batch(x)
        index += 1
      x = dense(self.bottleneck_dim, name=f'mlp_{index}')(x)
    x = parallel.constrain_batch(l2_normalize(x.astype(jnp.float32)))
    if not self.weight_norm:
      bound = 1.0 / math.sqrt(x.shape[-1])  # nn.Linear's default
      return nn.Dense(
        self.out_dim,
        use_bias=False,
        kernel_init=lambda key, shape, dtype: jax.random.uniform(
          key, shape, dtype, -bound, bound
        ),
        dtype=self.dtype,
        name='last_layer',
      )(x)
    return WeightNormLinear(
      self.out_dim,
      trainable_norm=not self.norm_last_layer,
      dtype=self.dtype,
      name='last_layer',
    )(x)


class MultiCropModel(nn.Module):
  """Backbone + head over crops of (at most) two resolutions (SPEC §6).

  Crops of one resolution go through the backbone as one batch; the head runs
  once on all rows. Parameters: ``{'backbone': ..., 'head': ...}``.
  """

  backbone: nn.Module
  head: nn.Module

  def __call__(
    self,
    global_crops: jax.Array,
    local_crops: jax.Array | None = None,
    train: bool = False,
  ) -> jax.Array:
    """Head outputs per crop.

    Args:
      global_crops: [G, B, H, W, C].
      local_crops: [L, B, h, w, C] or None.
      train: training mode: stochastic depth on, BatchNorm on batch
        statistics (updating ``batch_stats``, which must be mutable).

    Returns:
      [G + L, B, K] float32, crop-major (globals first).
    """
    # Rows stay batch-major: [V, B, ...] -> [B, V, ...] -> [B * V, ...]. The
    # batch axis B is split over the devices; a merge whose major factor is
    # B keeps that split, while [V * B] (B minor) cannot, and GSPMD would
    # gather every crop of the global batch onto every device.
    batch = global_crops.shape[1]

    def features(crops):  # [V, B, S, S, C] -> [B, V, D]
      n_views = crops.shape[0]
      rows = jnp.swapaxes(crops, 0, 1).reshape(-1, *crops.shape[2:])
      rows = parallel.constrain_batch(rows)
      return self.backbone(rows, train).reshape(batch, n_views, -1)

    feats = [features(global_crops)]
    if local_crops is not None and local_crops.shape[0] > 0:
      feats.append(features(local_crops))
    # [B, G + L, D]: joined on the crop axis, so B stays split.
    out = self.head(jnp.concatenate(feats, axis=1), train)  # [B, V, K]
    out = parallel.constrain_batch(out)
    return jnp.swapaxes(out.astype(jnp.float32), 0, 1)  # [V, B, K]
