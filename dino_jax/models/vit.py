"""Vision Transformer as in DINO (SPEC §2): CLS and patch tokens, NHWC input.

Parameter layout (Flax names; the PyTorch names of SPEC §6 in brackets):
``patch_embed`` [patch_embed.proj], ``cls_token``, ``pos_embed``,
``blocks_{i}/{norm1,attn/qkv,attn/proj,norm2,mlp/fc1,mlp/fc2}``, ``norm``.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dino_jax import parallel

# SPEC §2.3: trunc_normal(std=0.02) truncated at +-2 absolute = +-100 sigma,
# i.e. effectively a plain normal; Flax's truncated_normal cuts at 2 sigma.
_TRUNC_NORMAL = nn.initializers.normal(0.02)
_LN_EPS = 1e-6  # SPEC §2.1: the builders use eps 1e-6, not the 1e-5 default.
_SQRT_HALF = 0.7071067811865476


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU as PyTorch writes it: x / 2 * (1 + erf(x / sqrt 2)).

  ``jax.nn.gelu(approximate=False)`` goes through erfc, which XLA:CPU expands
  into exp and selects (2x slower here); both agree with PyTorch to 1e-6, and
  this form rounds like PyTorch more often (for x << 0 it gives 0 as PyTorch
  does, where the erfc form gives tiny negatives).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


VARIANTS = {
  'vit_tiny': dict(embed_dim=192, depth=12, num_heads=3),
  'vit_small': dict(embed_dim=384, depth=12, num_heads=6),
  'vit_base': dict(embed_dim=768, depth=12, num_heads=12),
}
ATTENTION_IMPLS = ('einsum', 'fused')


def _torch_default_uniform(bound: float):
  """PyTorch's default Conv2d and Linear init: U(-1/sqrt(in), 1/sqrt(in))."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def interpolate_pos_embed(
  pos_embed: jax.Array, grid_h: int, grid_w: int, height: int, width: int
) -> jax.Array:
  """Resample the patch positional embeddings to a grid_h x grid_w grid.

  SPEC §2.4: returned unchanged when the patch count equals the trained one
  and the image is square; otherwise bicubic (Keys A = -0.75, clamped
  borders, no antialiasing) with scale factor (n + 0.1) / sqrt(N) per axis, as
  PyTorch ``interpolate(scale_factor=...)`` maps coordinates.

  Args:
    pos_embed: [1, 1 + N, D] trained embeddings (CLS first).
    grid_h: patch rows of the input.
    grid_w: patch columns of the input.
    height: image height in pixels (for the square test).
    width: image width in pixels.

  Returns:
    [1, 1 + grid_h * grid_w, D].
  """
  num_patches = pos_embed.shape[1] - 1
  if num_patches == grid_h * grid_w and height == width:
    return pos_embed
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise ValueError(f'pos_embed holds {num_patches} patches, not a square')
  dim = pos_embed.shape[-1]
  cls_pos, grid = pos_embed[:, :1], pos_embed[0, 1:].reshape(side, side, dim)
  scale = jnp.array([(grid_h + 0.1) / side, (grid_w + 0.1) / side])
  grid = jax.image.scale_and_translate(
    grid.astype(jnp.float32),
    (grid_h, grid_w, dim),
    spatial_dims=(0, 1),
    scale=scale,
    translation=jnp.zeros(2),
    method='bicubic-pytorch',
    antialias=False,
  ).astype(pos_embed.dtype)
  # [grid_h, grid_w, D] -> [1, grid_h * grid_w, D], row-major as PyTorch.
  grid = grid.reshape(1, grid_h * grid_w, dim)
  return jnp.concatenate([cls_pos, grid], axis=1)


@jax.custom_vjp
def _layer_norm(x, scale, bias):
  """Two-pass LayerNorm over the last axis (as PyTorch), eps _LN_EPS."""
  return _layer_norm_fwd(x, scale, bias)[0]


def _layer_norm_fwd(x, scale, bias):
  mean = x.mean(-1, keepdims=True)
  centered = x - mean
  rstd = jax.lax.rsqrt(jnp.square(centered).mean(-1, keepdims=True) + _LN_EPS)
  normed = centered * rstd
  return normed * scale + bias, (normed, rstd, scale)


def _layer_norm_bwd(res, grad):
  normed, rstd, scale = res
  axes = tuple(range(grad.ndim - 1))
  d_scale = jnp.sum(grad * normed, axes)
  d_bias = jnp.sum(grad, axes)
  g = grad * scale
  d_x = rstd * (
    g
    - g.mean(-1, keepdims=True)
    - normed * (g * normed).mean(-1, keepdims=True)
  )
  return d_x, d_scale, d_bias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm with eps 1e-6 and PyTorch's two-pass variance.

  Same parameters as ``nn.LayerNorm`` (``scale``, ``bias``). Flax's default
  one-pass variance E[x^2] - E[x]^2 loses precision on tokens whose mean is
  large against their spread (error 3e-2 instead of 3e-5 at mean 50, std
  0.5). Flax's two-pass option costs 20 % of the ViT forward and backward on
  XLA:CPU; this hand-written backward pass does not.
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (d,))
    bias = self.param('bias', nn.initializers.zeros, (d,))
    # Statistics in float32 whatever the compute dtype, as nn.LayerNorm.
    y = _layer_norm(x.astype(jnp.float32), scale, bias)
    return y.astype(self.dtype)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> D features: PyTorch's stride-p Conv2d.

  Same parameters as ``nn.Conv`` (``kernel`` [p, p, C, D], ``bias`` [D]) but
  computed as one [B * N, p * p * C] x [p * p * C, D] matmul: XLA:CPU runs the
  strided convolution and its gradient 4-8x slower than the matmul. Border
  pixels that do not fill a patch are dropped, as with the VALID conv.
  """

  features: int
  patch_size: int
  kernel_init: Any
  bias_init: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> [B, H // p, W // p, D]."""
    p = self.patch_size
    b, height, width, chans = images.shape
    kernel = self.param(
      'kernel', self.kernel_init, (p, p, chans, self.features)
    )
    bias = self.param('bias', self.bias_init, (self.features,))
    gh, gw = height // p, width // p
    x = images[:, : gh * p, : gw * p].astype(self.dtype)
    # [B, gh, p, gw, p, C] -> [B, gh, gw, p, p, C]: the kernel's (p, p, C).
    x = x.reshape(b, gh, p, gw, p, chans).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, gh, gw, p * p * chans)
    kernel = kernel.reshape(p * p * chans, self.features).astype(self.dtype)
    return x @ kernel + bias.astype(self.dtype)


class DropPath(nn.Module):
  """Stochastic depth per sample (SPEC §2.2): x / keep * floor(keep + U)."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    # The GSPMD step's draw, also per device in a shard_map (parallel.py).
    uniform = parallel.batch_uniform(self.make_rng('drop_path'), shape, x.dtype)
    return x / keep * jnp.floor(keep + uniform)


@jax.custom_vjp
def _softmax(logits: jax.Array) -> jax.Array:
  """Softmax over the last axis with the textbook backward pass.

  d logits = p * (g - sum(g * p)): one fused elementwise pass over the saved
  probabilities, where the autodiff of exp / sum makes XLA:CPU materialise
  the broadcast 1 / sum over [B, H, T, T] first.
  """
  shifted = logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True))
  unnormalized = jnp.exp(shifted)
  return unnormalized / unnormalized.sum(-1, keepdims=True)


def _softmax_fwd(logits):
  probs = _softmax(logits)
  return probs, probs


def _softmax_bwd(probs, grad):
  return (probs * (grad - jnp.sum(grad * probs, -1, keepdims=True)),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


class Attention(nn.Module):
  """Multi-head self-attention with one qkv projection (SPEC §2.2 item 4)."""

  num_heads: int
  qkv_bias: bool = True
  impl: str = 'einsum'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, return_attention: bool = False) -> jax.Array:
    """x: [B, T, D] -> [B, T, D], or [B, heads, T, T] probabilities."""
    b, t, d = x.shape
    head_dim = d // self.num_heads
    scale = head_dim**-0.5
    dense = functools.partial(
      nn.Dense, kernel_init=_TRUNC_NORMAL, dtype=self.dtype
    )
    # Dense layers see [B * T, D]: with 2-D operands the weight gradients
    # are plain matmuls (a 3-D dot_general costs XLA:CPU a transposed copy of
    # the output gradient per layer).
    qkv = dense(3 * d, use_bias=self.qkv_bias, name='qkv')(x.reshape(b * t, d))
    # [B, T, 3D] -> [B, T, 3, heads, hd]: PyTorch's [3, heads, hd] layout.
    qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim)
    if return_attention or self.impl == 'einsum':
      # Heads-major [3, B, H, T, hd] once, so both batched matmuls run on
      # contiguous operands (5x faster forward on XLA:CPU than contracting
      # the [B, T, H, hd] layout in place).
      q, k, v = qkv.transpose(2, 0, 3, 1, 4)
      # Scaling q rather than the [B, H, T, T] logits saves a T/hd times
      # larger multiply (and XLA:CPU materialises the broadcast scale in the
      # backward pass); exact for head_dim = 4^n, e.g. 64 (scale = 1/8).
      logits = jnp.einsum('bhqd,bhkd->bhqk', q * scale, k)
      attn = _softmax(logits.astype(jnp.float32))
      if return_attention:
        return attn
      out = jnp.einsum('bhqk,bhkd->bhqd', attn.astype(v.dtype), v)
      out = out.transpose(0, 2, 1, 3)  # [B, T, H, hd]
    elif self.impl == 'fused':
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, hd]
      out = jax.nn.dot_product_attention(q, k, v, scale=scale)
    else:
      raise ValueError(
        f'attention impl {self.impl!r} unknown; use one of {ATTENTION_IMPLS}'
      )
    out = out.reshape(b * t, d)  # heads concatenated head-major
    return dense(d, name='proj')(out).reshape(b, t, d)


class Mlp(nn.Module):
  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    dense = functools.partial(
      nn.Dense, kernel_init=_TRUNC_NORMAL, dtype=self.dtype
    )
    x = x.reshape(-1, shape[-1])  # 2-D matmuls, as in Attention
    x = dense(self.hidden_dim, name='fc1')(x)
    x = gelu(x)  # SPEC §2.2: exact erf GELU.
    return dense(shape[-1], name='fc2')(x).reshape(shape)


class Block(nn.Module):
  """Pre-norm transformer block with stochastic depth."""

  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path: float = 0.0
  attention: str = 'einsum'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool = False, return_attention: bool = False
  ) -> jax.Array:
    norm = functools.partial(LayerNorm, dtype=self.dtype)
    attn = Attention(
      self.num_heads, self.qkv_bias, self.attention, self.dtype, name='attn'
    )
    y = attn(norm(name='norm1')(x), return_attention=return_attention)
    if return_attention:
      return y
    x = x + DropPath(self.drop_path)(y, train)
    hidden = int(x.shape[-1] * self.mlp_ratio)
    y = Mlp(hidden, self.dtype, name='mlp')(norm(name='norm2')(x))
    return x + DropPath(self.drop_path)(y, train)


class VisionTransformer(nn.Module):
  """DINO's ViT. ``apply(variables, images)`` -> CLS after the final norm.

  Attributes:
    patch_size: 8 or 16.
    embed_dim, depth, num_heads, mlp_ratio, qkv_bias: SPEC §2.1.
    drop_path_rate: stochastic depth of the last block; linear over depth.
    img_size: training image size; fixes the size of ``pos_embed``.
    attention: 'einsum' (explicit softmax) or 'fused'
      (``jax.nn.dot_product_attention``); same numbers.
    dtype: compute dtype (parameters stay float32).
    remat: recompute each block in the backward pass to save memory.
  """

  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  img_size: int = 224
  attention: str = 'einsum'
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    p, d = self.patch_size, self.embed_dim
    # SPEC §2.3: the patch conv keeps PyTorch's default init.
    bound = 1.0 / math.sqrt(3 * p * p)
    self.patch_embed = PatchEmbed(
      d,
      p,
      kernel_init=_torch_default_uniform(bound),
      bias_init=_torch_default_uniform(bound),
      dtype=self.dtype,
    )
    num_patches = (self.img_size // p) ** 2
    self.cls_token = self.param('cls_token', _TRUNC_NORMAL, (1, 1, d))
    self.pos_embed = self.param(
      'pos_embed', _TRUNC_NORMAL, (1, num_patches + 1, d)
    )
    # train and return_attention are Python bools: static under remat
    # (argument 0 is the module itself).
    block_cls = nn.remat(Block, static_argnums=(2, 3)) if self.remat else Block
    rates = [
      self.drop_path_rate * i / max(self.depth - 1, 1)
      for i in range(self.depth)
    ]  # torch.linspace(0, rate, depth)
    self.blocks = [
      block_cls(
        self.num_heads,
        self.mlp_ratio,
        self.qkv_bias,
        rates[i],
        self.attention,
        self.dtype,
      )
      for i in range(self.depth)
    ]
    self.norm = LayerNorm(dtype=self.dtype)

  def prepare_tokens(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] -> tokens [B, 1 + h0 * w0, D] with positions."""
    if images.ndim != 4:
      raise ValueError(f'images must be [B, H, W, C]; got {images.shape}')
    b, height, width, _ = images.shape
    x = self.patch_embed(images.astype(self.dtype))  # [B, h0, w0, D]
    grid_h, grid_w = x.shape[1], x.shape[2]
    x = x.reshape(b, grid_h * grid_w, self.embed_dim)
    cls = jnp.broadcast_to(self.cls_token, (b, 1, self.embed_dim))
    x = jnp.concatenate([cls.astype(x.dtype), x], axis=1)
    pos = interpolate_pos_embed(self.pos_embed, grid_h, grid_w, height, width)
    return x + pos.astype(x.dtype)

  def features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """All tokens after the final norm: [B, 1 + N, D] (CLS first)."""
    x = self.prepare_tokens(images)
    for block in self.blocks:
      x = block(x, train, False)
    return self.norm(x)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """CLS token after the final norm: [B, D]."""
    return self.features(images, train)[:, 0]

  def last_self_attention(self, images: jax.Array) -> jax.Array:
    """Last block's attention probabilities: [B, heads, N + 1, N + 1]."""
    x = self.prepare_tokens(images)
    for block in self.blocks[:-1]:
      x = block(x, False, False)
    return self.blocks[-1](x, False, True)

  def intermediate_layers(
    self, images: jax.Array, n: int = 1
  ) -> tuple[jax.Array, ...]:
    """Outputs of the last n blocks, each after the final norm, earliest first.

    Returns:
      tuple of n arrays [B, N + 1, D].
    """
    x = self.prepare_tokens(images)
    outputs = []
    for i, block in enumerate(self.blocks):
      x = block(x, False, False)
      if i >= self.depth - n:
        outputs.append(self.norm(x))
    return tuple(outputs)


def _build(arch: str, patch_size: int, **kwargs: Any) -> VisionTransformer:
  return VisionTransformer(
    patch_size=patch_size, **{**VARIANTS[arch], **kwargs}
  )


def vit_tiny(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
  """ViT-Tiny: D 192, depth 12, 3 heads."""
  return _build('vit_tiny', patch_size, **kwargs)


def vit_small(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
  """ViT-Small: D 384, depth 12, 6 heads."""
  return _build('vit_small', patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
  """ViT-Base: D 768, depth 12, 12 heads."""
  return _build('vit_base', patch_size, **kwargs)
