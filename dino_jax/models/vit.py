"""Vision Transformer as in DINO (SPEC §2): CLS and patch tokens, NHWC input.

Parameter layout (Flax names; the PyTorch names of SPEC §6 in brackets):
``patch_embed`` [patch_embed.proj], ``cls_token``, ``pos_embed``,
``blocks_{i}/{norm1,attn/qkv,attn/proj,norm2,mlp/fc1,mlp/fc2}``, ``norm``.
"""

import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
ATTENTION_IMPLS = ('einsum', 'fused', 'flash')
_FLASH_BLOCK = 128  # the Pallas TPU kernel's sequence tile
# model.remat_policy -> jax.checkpoint policy (None: save nothing).
REMAT_POLICIES = {
  'nothing': None,
  'dots': jax.checkpoint_policies.dots_saveable,
  'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
    return drop_path(x, 1.0 - self.rate, self.make_rng('drop_path'))


def drop_path(x: jax.Array, keep: Any, key: jax.Array) -> jax.Array:
  """x / keep * floor(keep + U), U ~ uniform per sample (row of ``x``).

  ``keep`` is 1 - rate: a Python float (``DropPath``) or a scalar of
  ``x.dtype`` (the scanned blocks' rate, indexed by layer).
  """
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  # The GSPMD step's draw, also per device in a shard_map (parallel.py).
  uniform = parallel.batch_uniform(key, shape, x.dtype)
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


def flash_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, scale: float
) -> jax.Array:
  """softmax(q k^T * scale) v by the Pallas TPU flash kernel: [B, H, T, hd].

  ``jax.experimental.pallas.ops.tpu.flash_attention``: the [T, T] scores
  stay in VMEM (forward and backward), never in HBM. The kernel tiles the
  sequence by 128, so T is padded up to a multiple of 128 and the padding
  masked by segment ids (tokens 1, padding 0: a padded query sees only
  padding, so no row is empty, and no token sees padding). Under a mesh
  the kernel runs on each device's batch rows (a ``shard_map`` over the
  batch axes): GSPMD cannot split a custom call. TPU only (on a CPU inside
  ``pltpu.force_tpu_interpret_mode()``, for tests).
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_fa
  from jax.sharding import PartitionSpec

  t = q.shape[2]
  padded = -(-t // _FLASH_BLOCK) * _FLASH_BLOCK

  def local(q, k, v):
    pad = ((0, 0), (0, 0), (0, padded - t), (0, 0))
    ids = (jnp.arange(padded) < t).astype(jnp.int32)
    ids = jnp.broadcast_to(ids, (q.shape[0], padded))
    out = pallas_fa.flash_attention(
      *(jnp.pad(x, pad) for x in (q, k, v)),
      segment_ids=pallas_fa.SegmentIds(ids, ids),
      sm_scale=scale,
    )
    return out[:, :, :t]

  mesh = jax.sharding.get_abstract_mesh()
  axes = set(parallel.BATCH_AXES)
  if mesh.empty or not axes <= set(mesh.axis_names):
    return local(q, k, v)
  if axes <= set(mesh.manual_axes):  # already on this device's rows
    return local(q, k, v)
  rows = PartitionSpec(parallel.BATCH_AXES)
  return jax.shard_map(
    local, mesh=mesh, in_specs=(rows,) * 3, out_specs=rows, check_vma=False
  )(q, k, v)


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
    elif self.impl == 'flash':
      q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # [B, H, T, hd], as the kernel
      out = flash_attention(q, k, v, scale).transpose(0, 2, 1, 3)
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
    self,
    x: jax.Array,
    train: bool = False,
    return_attention: bool = False,
    drop: tuple[tuple[float, ...], jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    """x [B, T, D] -> [B, T, D] (or the attention probabilities).

    ``drop``: the scanned blocks' drop path, (keep probability of every
    layer, this layer's index, its two keys [2]), in place of ``drop_path``
    and the ``drop_path`` RNG stream.
    """
    norm = functools.partial(LayerNorm, dtype=self.dtype)

    def residual(y, j):
      if drop is None:
        return DropPath(self.drop_path)(y, train)
      keeps, index, keys = drop
      keep = jnp.asarray(np.asarray(keeps, y.dtype))[index]
      return drop_path(y, keep, keys[j])

    attn = Attention(
      self.num_heads, self.qkv_bias, self.attention, self.dtype, name='attn'
    )
    y = attn(norm(name='norm1')(x), return_attention=return_attention)
    if return_attention:
      return y
    x = x + residual(y, 0)
    hidden = int(x.shape[-1] * self.mlp_ratio)
    y = Mlp(hidden, self.dtype, name='mlp')(norm(name='norm2')(x))
    return x + residual(y, 1)


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
    remat_policy: with remat, what each block keeps for the backward pass
      (REMAT_POLICIES: 'nothing' recomputes the whole block; 'dots' keeps
      every matmul's output, 'dots_no_batch' those without batch dimensions:
      the dense layers', not attention's).
    scan_blocks: run the blocks as one ``nn.scan`` over a Block whose
      parameters are stacked on a leading axis of size ``depth`` (``blocks``,
      in place of ``blocks_0`` ... ``blocks_{depth-1}``; ``stack_blocks`` /
      ``unstack_blocks`` convert): the compiled program holds one block.
      Same numbers, drop path included (each layer's rate and RNG keys as
      the unrolled blocks draw them).
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
  remat_policy: str = 'nothing'
  scan_blocks: bool = False

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
    block_cls = Block
    if self.remat:
      block_cls = nn.remat(
        Block,
        static_argnums=(2, 3),
        policy=REMAT_POLICIES[self.remat_policy],
      )
    if self.scan_blocks:
      # One Block, scanned by _scan, which gives it its drop path.
      self.blocks = self._block()
      # The unrolled blocks' drop path keys, drawn where they draw them:
      # modules named blocks_{i}/DropPath_{j}, no parameters.
      self.drop_path_keys = [
        _DropPathKeys(name=f'blocks_{i}') for i in range(self.depth)
      ]
    else:
      self.blocks = [
        block_cls(
          self.num_heads,
          self.mlp_ratio,
          self.qkv_bias,
          rate,
          self.attention,
          self.dtype,
        )
        for rate in self.drop_path_rates()
      ]
    self.norm = LayerNorm(dtype=self.dtype)

  def drop_path_rates(self) -> list[float]:
    """Each block's drop path rate: torch.linspace(0, rate, depth)."""
    return [
      self.drop_path_rate * i / max(self.depth - 1, 1)
      for i in range(self.depth)
    ]

  def _block(self, **kwargs: Any) -> Block:
    """The scanned layout's Block (its drop path comes from ``drop``)."""
    return Block(
      self.num_heads,
      self.mlp_ratio,
      self.qkv_bias,
      0.0,
      self.attention,
      self.dtype,
      **kwargs,
    )

  def _scan(self, x: jax.Array, train: bool) -> jax.Array:
    """Every block, as one ``nn.scan`` over the stacked parameters."""
    keeps = tuple(1.0 - rate for rate in self.drop_path_rates())
    drop = train and self.drop_path_rate > 0.0
    layers = None
    if drop:
      keys = [jnp.stack(probe()) for probe in self.drop_path_keys]
      layers = (jnp.arange(self.depth), jnp.stack(keys))

    def body(block, x, layer):
      index_keys = (keeps, *layer) if layer is not None else None
      return block(x, train, False, index_keys), None

    if self.remat:  # as nn.remat(Block)
      body = nn.remat(
        body, prevent_cse=False, policy=REMAT_POLICIES[self.remat_policy]
      )
    scan = nn.scan(
      body,
      variable_axes={'params': 0},
      split_rngs={'params': True},
      length=self.depth,
    )
    return scan(self.blocks, x, layers)[0]

  def _layer(self, i: int):
    """Block i of the scanned layout as a function of x (evaluation)."""
    params = layer_slice(self.variables['params']['blocks'], i)
    block = self._block(parent=None)  # unbound: a pure function
    return functools.partial(block.apply, {'params': params})

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
    if self.scan_blocks:
      return self.norm(self._scan(x, train))
    for block in self.blocks:
      x = block(x, train, False)
    return self.norm(x)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """CLS token after the final norm: [B, D]."""
    return self.features(images, train)[:, 0]

  def last_self_attention(self, images: jax.Array) -> jax.Array:
    """Last block's attention probabilities: [B, heads, N + 1, N + 1]."""
    x = self.prepare_tokens(images)
    blocks = self._layers()
    for block in blocks[:-1]:
      x = block(x, False, False)
    return blocks[-1](x, False, True)

  def _layers(self) -> list:
    """The blocks as functions (x, train, return_attention) -> y."""
    if self.scan_blocks:
      return [self._layer(i) for i in range(self.depth)]
    return list(self.blocks)

  def intermediate_layers(
    self, images: jax.Array, n: int = 1
  ) -> tuple[jax.Array, ...]:
    """Outputs of the last n blocks, each after the final norm, earliest first.

    Returns:
      tuple of n arrays [B, N + 1, D].
    """
    x = self.prepare_tokens(images)
    outputs = []
    for i, block in enumerate(self._layers()):
      x = block(x, False, False)
      if i >= self.depth - n:
        outputs.append(self.norm(x))
    return tuple(outputs)


class _DropPathKey(nn.Module):
  """One ``drop_path`` key, drawn as a ``DropPath`` at this path draws it."""

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.make_rng('drop_path')


class _DropPathKeys(nn.Module):
  """Named ``blocks_{i}``: the keys of block i's two drop paths."""

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    return tuple(_DropPathKey(name=f'DropPath_{j}')() for j in (0, 1))


_UNROLLED = re.compile(r'blocks_(\d+)')


def stack_blocks(tree: Any) -> Any:
  """The scanned layout of a parameter tree: ``blocks_{i}`` -> ``blocks``.

  Wherever a mapping holds ``blocks_0`` ... ``blocks_{L-1}`` (a backbone's
  parameters, alone or inside ``{'backbone': ..., 'head': ...}``, a state's
  ``student`` or ``teacher``), they become one ``blocks`` whose leaves are
  stacked on a new leading axis of size L. Pure; the inverse of
  ``unstack_blocks``.
  """
  if not isinstance(tree, Mapping):
    return tree
  out = {
    k: stack_blocks(v) for k, v in tree.items() if not _UNROLLED.fullmatch(k)
  }
  layers = sorted(
    (int(m.group(1)), k) for k in tree if (m := _UNROLLED.fullmatch(k))
  )
  if layers:
    if [i for i, _ in layers] != list(range(len(layers))):
      raise ValueError(
        f'blocks {[i for i, _ in layers]} are not 0 ... {len(layers) - 1}'
      )
    if 'blocks' in tree:
      raise ValueError('both blocks and blocks_0 ...: a mixed layout')
    out['blocks'] = jax.tree.map(
      lambda *a: jnp.stack(a), *(tree[k] for _, k in layers)
    )
  return out


def unstack_blocks(tree: Any) -> Any:
  """The unrolled layout of a parameter tree: ``blocks`` -> ``blocks_{i}``.

  The inverse of ``stack_blocks``: each leaf under a ``blocks`` mapping is
  split along its leading axis.
  """
  if not isinstance(tree, Mapping):
    return tree
  out = {k: unstack_blocks(v) for k, v in tree.items() if k != 'blocks'}
  if 'blocks' in tree:
    leaves = jax.tree.leaves(tree['blocks'])
    for i in range(leaves[0].shape[0]):
      out[f'blocks_{i}'] = layer_slice(tree['blocks'], i)
  return out


def layer_slice(stacked: Any, i: int) -> Any:
  """Layer i of a tree of stacked leaves."""
  return jax.tree.map(lambda a: a[i], stacked)


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
