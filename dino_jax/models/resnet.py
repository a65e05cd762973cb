"""ResNet backbone in torchvision's layout (SPEC §5), NHWC input.

torchvision v1.5 ResNet: the stride of a bottleneck sits on its 3x3 conv; a
1x1 conv + BatchNorm ``downsample`` projects the shortcut when the shape
changes; convs have no bias; padding is symmetric as in torch (stem 7x7/2 pad
3, max-pool 3x3/2 pad 1 with -inf padding, 3x3 convs pad 1), not Flax
``'SAME'``, which pads asymmetrically for stride 2 on even sizes. The fc layer
is removed: the output is the global average pool, 2048-d for resnet50 and
512-d for resnet18/34.

BatchNorm follows torch: eps 1e-5, momentum 0.1 (running = 0.9 running + 0.1
batch), and the running variance takes the *unbiased* batch variance (n / (n -
1) times the biased one used to normalise). Flax's ``nn.BatchNorm`` stores the
biased variance, so a small BatchNorm is defined here.

Flax names (torchvision names in brackets): ``conv1`` [conv1], ``bn1`` [bn1],
``layer{i}_{j}`` [layer{i}.{j}] with ``conv{k}``, ``bn{k}``,
``downsample_conv`` [downsample.0], ``downsample_bn`` [downsample.1]. Conv
kernels are HWIO (torch OIHW); BatchNorm ``scale``/``bias`` [weight/bias] are
params, ``mean``/``var`` [running_mean/running_var] are in ``batch_stats``.
"""

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # Flax convention: torch momentum 0.1.

# kaiming_normal_(mode='fan_out', nonlinearity='relu'): std sqrt(2 / fan_out),
# fan_out = out_channels * kh * kw, untruncated normal.
_KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class BatchNorm(nn.Module):
  """torch BatchNorm2d over the last axis (running var with unbiased var)."""

  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPS
  scale_init: Any = nn.initializers.ones
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', self.scale_init, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable(
      'batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32)
    )
    ra_var = self.variable(
      'batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32)
    )
    axes = tuple(range(x.ndim - 1))
    if train:
      xf = x.astype(jnp.float32)
      n = int(np.prod([x.shape[a] for a in axes]))
      mean = jnp.mean(xf, axes)
      if self.axis_name is not None:  # Statistics over the global batch.
        mean = jax.lax.pmean(mean, self.axis_name)
        n = n * jax.lax.psum(1, self.axis_name)
      # Centred second pass (E[x^2] - E[x]^2 cancels badly in float32).
      var = jnp.mean(jnp.square(xf - mean), axes)
      if self.axis_name is not None:
        var = jax.lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
        ra_var.value = m * ra_var.value + (1.0 - m) * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    inv = jax.lax.rsqrt(var + self.epsilon) * scale
    # Normalised in float32 and cast back (as Flax's BatchNorm): x - mean
    # in bfloat16 cancels where the mean is large against the spread.
    y = (x.astype(jnp.float32) - mean) * inv + bias
    return y.astype(x.dtype)


def _conv(
  features: int, kernel: int, stride: int, name: str, dtype: Any = jnp.float32
) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=_KAIMING_FAN_OUT,
    dtype=dtype,
    name=name,
  )


class BasicBlock(nn.Module):
  """Two 3x3 convs; expansion 1."""

  planes: int
  stride: int = 1
  downsample: bool = False
  zero_init_residual: bool = False
  axis_name: str | None = None
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = lambda name, **kw: BatchNorm(  # noqa: E731
      axis_name=self.axis_name, name=name, **kw
    )
    last_init = (
      nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    )
    y = _conv(self.planes, 3, self.stride, 'conv1', self.dtype)(x)
    y = nn.relu(bn('bn1')(y, train))
    y = _conv(self.planes, 3, 1, 'conv2', self.dtype)(y)
    y = bn('bn2', scale_init=last_init)(y, train)
    if self.downsample:
      x = _conv(self.planes, 1, self.stride, 'downsample_conv', self.dtype)(x)
      x = bn('downsample_bn')(x, train)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (carries the stride, v1.5), 1x1 expand; expansion 4."""

  planes: int
  stride: int = 1
  downsample: bool = False
  zero_init_residual: bool = False
  axis_name: str | None = None
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = lambda name, **kw: BatchNorm(  # noqa: E731
      axis_name=self.axis_name, name=name, **kw
    )
    last_init = (
      nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    )
    out = self.planes * self.expansion
    y = _conv(self.planes, 1, 1, 'conv1', self.dtype)(x)
    y = nn.relu(bn('bn1')(y, train))
    y = _conv(self.planes, 3, self.stride, 'conv2', self.dtype)(y)
    y = nn.relu(bn('bn2')(y, train))
    y = _conv(out, 1, 1, 'conv3', self.dtype)(y)
    y = bn('bn3', scale_init=last_init)(y, train)
    if self.downsample:
      x = _conv(out, 1, self.stride, 'downsample_conv', self.dtype)(x)
      x = bn('downsample_bn')(x, train)
    return nn.relu(y + x)


def _max_pool_torch(x: jax.Array) -> jax.Array:
  """MaxPool2d(3, stride 2, padding 1): symmetric -inf padding."""
  return jax.lax.reduce_window(
    x,
    -jnp.inf,
    jax.lax.max,
    (1, 3, 3, 1),
    (1, 2, 2, 1),
    ((0, 0), (1, 1), (1, 1), (0, 0)),
  )


class ResNet(nn.Module):
  """torchvision ResNet without fc: NHWC images -> pooled features."""

  block: str  # 'basic' or 'bottleneck'
  layers: Sequence[int]
  zero_init_residual: bool = False
  axis_name: str | None = None
  width: int = 64  # stem and first stage width (torchvision: 64)
  # Compute dtype of the convs and activations; parameters, BatchNorm
  # statistics and the pooled features stay float32.
  dtype: Any = jnp.float32

  @property
  def num_features(self) -> int:
    return 8 * self.width * (4 if self.block == 'bottleneck' else 1)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    block_cls = Bottleneck if self.block == 'bottleneck' else BasicBlock
    expansion = block_cls.expansion
    x = _conv(self.width, 7, 2, 'conv1', self.dtype)(x.astype(self.dtype))
    x = BatchNorm(axis_name=self.axis_name, name='bn1')(x, train)
    x = _max_pool_torch(nn.relu(x))
    inplanes = self.width
    for i, n in enumerate(self.layers):
      planes = self.width * 2**i
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        down = j == 0 and (stride != 1 or inplanes != planes * expansion)
        x = block_cls(
          planes,
          stride,
          down,
          self.zero_init_residual,
          self.axis_name,
          self.dtype,
          name=f'layer{i + 1}_{j}',
        )(x, train)
        inplanes = planes * expansion
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def resnet18(**kw) -> ResNet:
  return ResNet('basic', (2, 2, 2, 2), **kw)


def resnet34(**kw) -> ResNet:
  return ResNet('basic', (3, 4, 6, 3), **kw)


def resnet50(**kw) -> ResNet:
  return ResNet('bottleneck', (3, 4, 6, 3), **kw)


ARCHS = {'resnet18': resnet18, 'resnet34': resnet34, 'resnet50': resnet50}

_BN_TO_TORCH = {
  'scale': 'weight',
  'bias': 'bias',
  'mean': 'running_mean',
  'var': 'running_var',
}
_BN_FROM_TORCH = {v: k for k, v in _BN_TO_TORCH.items()}
_LAYER = re.compile(r'^layer(\d)_(\d+)$')


def _module_to_torch(path: Sequence[str]) -> str:
  """('layer1_0', 'downsample_conv') -> 'layer1.0.downsample.0'."""
  parts = []
  for name in path:
    m = _LAYER.match(name)
    if m:
      parts += [f'layer{m.group(1)}', m.group(2)]
    elif name == 'downsample_conv':
      parts += ['downsample', '0']
    elif name == 'downsample_bn':
      parts += ['downsample', '1']
    else:
      parts.append(name)
  return '.'.join(parts)


def _module_from_torch(prefix: str) -> tuple[str, ...]:
  """'layer1.0.downsample.0' -> ('layer1_0', 'downsample_conv')."""
  parts = prefix.split('.')
  out = []
  i = 0
  while i < len(parts):
    p = parts[i]
    if re.fullmatch(r'layer\d', p):
      out.append(f'{p}_{parts[i + 1]}')
      i += 2
    elif p == 'downsample':
      out.append({'0': 'downsample_conv', '1': 'downsample_bn'}[parts[i + 1]])
      i += 2
    else:
      out.append(p)
      i += 1
  return tuple(out)


def torch_name(path: Sequence[str]) -> tuple[str, bool]:
  """A Flax variable path -> (torchvision key, whether it is a conv kernel).

  ('layer1_0', 'downsample_bn', 'var') -> ('layer1.0.downsample.1.running_var',
  False); ('conv1', 'kernel') -> ('conv1.weight', True).
  """
  prefix = _module_to_torch(path[:-1])
  if path[-1] == 'kernel':
    return f'{prefix}.weight', True
  return f'{prefix}.{_BN_TO_TORCH[path[-1]]}', False


def to_torchvision(variables: Any) -> dict[str, np.ndarray]:
  """Flax {'params', 'batch_stats'} -> torchvision state_dict (numpy, no fc).

  Conv kernels HWIO -> OIHW; ``num_batches_tracked`` is written as 0 (int64).
  """
  flat_p = traverse_util.flatten_dict(dict(variables['params']))
  flat_s = traverse_util.flatten_dict(dict(variables['batch_stats']))
  out = {}
  for path, v in list(flat_p.items()) + list(flat_s.items()):
    v = np.asarray(v)
    module, leaf = path[:-1], path[-1]
    prefix = _module_to_torch(module)
    if leaf == 'kernel':
      out[f'{prefix}.weight'] = np.ascontiguousarray(v.transpose(3, 2, 0, 1))
    else:
      out[f'{prefix}.{_BN_TO_TORCH[leaf]}'] = v
      if leaf == 'scale':
        out[f'{prefix}.num_batches_tracked'] = np.zeros((), np.int64)
  return out


def from_torchvision(state_dict: Any) -> dict[str, Any]:
  """torchvision state_dict (torch tensors or arrays) -> Flax variables.

  ``fc.*`` and ``num_batches_tracked`` are ignored; OIHW -> HWIO.
  """
  params, stats = {}, {}
  for key, v in state_dict.items():
    prefix, leaf = key.rsplit('.', 1)
    if prefix == 'fc' or leaf == 'num_batches_tracked':
      continue
    if hasattr(v, 'detach'):
      v = v.detach().cpu().numpy()
    v = np.asarray(v, np.float32)
    module = _module_from_torch(prefix)
    if v.ndim == 4:
      params[module + ('kernel',)] = jnp.asarray(v.transpose(2, 3, 1, 0))
    else:
      name = _BN_FROM_TORCH[leaf]
      tgt = stats if name in ('mean', 'var') else params
      tgt[module + (name,)] = jnp.asarray(v)
  return {
    'params': traverse_util.unflatten_dict(params),
    'batch_stats': traverse_util.unflatten_dict(stats),
  }
