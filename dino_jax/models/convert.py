"""Official PyTorch DINO parameters <-> dino_jax variables (SPEC §6, §2.8).

``from_pytorch(state_dict_or_path, module)`` and ``to_pytorch(variables,
module)`` for ``VisionTransformer`` and ``ResNet`` backbones and
``DINOHead`` heads. Keys follow the official code
(``blocks.0.attn.qkv.weight``, ``mlp.0.weight``, ``last_layer.weight_g``
...), with or without ``module.`` / ``backbone.`` / ``head.`` prefixes; a
ViT with scanned blocks (``scan_blocks``) stacks the ``blocks.{i}.*``
tensors into its ``blocks`` on import and splits them on export.
``.pth`` files are read with ``torch.load(..., weights_only=True)``:
tensors only, never arbitrary pickled objects. Whole checkpoints to and
from workdirs: ``dino_jax/pth.py``; the command: ``dino_jax.interop``.
"""

import argparse
import io
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import storage
from dino_jax.models import resnet as resnet_lib
from dino_jax.models import vit as vit_lib
from dino_jax.models.head import DINOHead
from dino_jax.models.resnet import ResNet
from dino_jax.models.vit import VisionTransformer

_PREFIXES = ('module.', 'backbone.')


class InteropError(ValueError):
  """A checkpoint does not fit the module; the message lists the keys."""


def torch_load(path: str):
  """torch.load with weights_only: tensors and plain containers only.

  Official full checkpoints also hold their argparse.Namespace ('args'), a
  plain attribute bag: the one other object allowed.
  """
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      'reading .pth files needs PyTorch: pip install "dino_jax[torch]" '
      '(or pip install torch==2.13.0 for the CPU build)'
    ) from e
  # A URL (gs://...) is read whole into memory first; torch reads a file.
  source = (
    io.BytesIO(storage.as_path(path).read_bytes())
    if storage.is_remote(path)
    else path
  )
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(source, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 - pickled non-tensor objects
    raise InteropError(
      f'{path}: not a tensor-only checkpoint ({type(e).__name__}: '
      f'{str(e).splitlines()[0][:200]}); refusing to unpickle it: pass an '
      'official DINO .pth'
    ) from e


def load_pth(path: str, checkpoint_key: str = 'teacher') -> dict:
  """Tensors of a .pth file as numpy arrays (official key names).

  A training checkpoint (``student``/``teacher`` dicts) yields the
  ``checkpoint_key`` entry; a linear-probe file its ``state_dict``.
  """
  return to_numpy(state_dict_of(torch_load(path), checkpoint_key))


def state_dict_of(obj, checkpoint_key):
  if isinstance(obj, dict) and checkpoint_key in obj:
    return obj[checkpoint_key]
  if isinstance(obj, dict) and 'state_dict' in obj:
    return obj['state_dict']
  return obj


def to_numpy(tree) -> dict:
  out = {}
  for key, value in tree.items():
    if hasattr(value, 'detach'):
      value = value.detach().cpu().float().numpy()
    out[key] = np.asarray(value)
  return out


def strip_prefixes(state_dict: dict) -> dict:
  """Drops ``module.`` and ``backbone.`` (official eval scripts do the same)."""
  out = {}
  for key, value in state_dict.items():
    for prefix in _PREFIXES:
      key = key.replace(prefix, '') if key.startswith(prefix) else key
    out[key] = value
  return out


# (flax path regex, torch key template, transform to torch)
_T = lambda x: np.transpose(x)  # Linear: [in, out] -> [out, in]


_VIT_RULES = [
  (r'cls_token', 'cls_token', None),
  (r'pos_embed', 'pos_embed', None),
  (
    r'patch_embed/kernel',
    'patch_embed.proj.weight',
    lambda x: np.transpose(x, (3, 2, 0, 1)),
  ),  # HWIO -> OIHW
  (r'patch_embed/bias', 'patch_embed.proj.bias', None),
  (r'blocks_(\d+)/(norm1|norm2)/scale', 'blocks.{0}.{1}.weight', None),
  (r'blocks_(\d+)/(norm1|norm2)/bias', 'blocks.{0}.{1}.bias', None),
  (
    r'blocks_(\d+)/(attn|mlp)/(qkv|proj|fc1|fc2)/kernel',
    'blocks.{0}.{1}.{2}.weight',
    _T,
  ),
  (
    r'blocks_(\d+)/(attn|mlp)/(qkv|proj|fc1|fc2)/bias',
    'blocks.{0}.{1}.{2}.bias',
    None,
  ),
  (r'norm/scale', 'norm.weight', None),
  (r'norm/bias', 'norm.bias', None),
]


_HEAD_RULES = [
  (r'mlp_(\d+)/kernel', 'mlp.{0}.weight', _T),
  (r'mlp_(\d+)/bias', 'mlp.{0}.bias', None),
  (r'mlp_(\d+)/scale', 'mlp.{0}.weight', None),  # BatchNorm
  (r'mean', 'mlp.{0}.running_mean', None),
  (r'var', 'mlp.{0}.running_var', None),
  (r'last_layer/weight_v', 'last_layer.weight_v', _T),
  (r'last_layer/weight_g', 'last_layer.weight_g', _T),
  (r'last_layer/kernel', 'last_layer.weight', _T),  # no weight norm
]


# A ResNet's names come from models/resnet.py (torchvision's layout).
_RESNET_RULES = 'resnet'


_OIHW = lambda x: np.transpose(x, (3, 2, 0, 1))  # noqa: E731 - HWIO -> OIHW


def _inverse(transform, array):
  if transform is None:
    return array
  if transform is _T:
    return np.transpose(array)
  return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO


def _flat(tree) -> dict[str, Any]:
  return {
    '/'.join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()
  }


def _torch_key(path: str, rules, collection: str = 'params'):
  if rules is _RESNET_RULES:
    key, kernel = resnet_lib.torch_name(tuple(path.split('/')))
    return key, _OIHW if kernel else None
  if collection == 'batch_stats':  # path like mlp_1/mean
    layer, stat = path.split('/')
    index = layer.split('_')[1]
    name = {'mean': 'running_mean', 'var': 'running_var'}[stat]
    return f'mlp.{index}.{name}', None
  for pattern, template, transform in rules:
    match = re.fullmatch(pattern, path)
    if match:
      return template.format(*match.groups()), transform
  raise InteropError(f'no PyTorch name for parameter {path!r}')


def _abstract_variables(module, state_dict=None):
  if isinstance(module, VisionTransformer):
    x = jnp.zeros((1, module.img_size, module.img_size, 3))
    return jax.eval_shape(module.init, jax.random.key(0), x), _VIT_RULES
  if isinstance(module, DINOHead):
    dim = None
    if state_dict is not None:
      first = 'mlp.0.weight' if 'mlp.0.weight' in state_dict else None
      dim = state_dict[first].shape[1] if first else None
    dim = dim or 384
    x = jnp.zeros((2, dim))
    return jax.eval_shape(module.init, jax.random.key(0), x), _HEAD_RULES
  if isinstance(module, ResNet):
    x = jnp.zeros((1, 32, 32, 3))
    return jax.eval_shape(module.init, jax.random.key(0), x), _RESNET_RULES
  raise TypeError(
    f'interop supports VisionTransformer, ResNet and DINOHead, not '
    f'{type(module).__name__}'
  )


def _head_keys(state_dict: dict, module) -> dict:
  """Selects head keys: drops 'head.', maps parametrized weight norm."""
  has_head = any(k.startswith('head.') for k in state_dict)
  out = {}
  for key, value in state_dict.items():
    if has_head:
      if not key.startswith('head.'):
        continue
      key = key[len('head.') :]
    key = key.replace(
      'last_layer.parametrizations.weight.original0', 'last_layer.weight_g'
    )
    key = key.replace(
      'last_layer.parametrizations.weight.original1', 'last_layer.weight_v'
    )
    out[key] = value
  del module
  return out


def from_pytorch(state_dict_or_path, module) -> dict:
  """Flax variables for ``module`` from an official state dict or .pth path.

  Args:
    state_dict_or_path: a dict of arrays/tensors with official key names
      (backbone or head; prefixes ``module.``/``backbone.``/``head.`` ok), a
      training checkpoint dict (its ``teacher`` is used), or a .pth path.
    module: a ``VisionTransformer`` or ``DINOHead``.

  Returns:
    ``{'params': ...}`` (plus ``batch_stats`` for a BN head).

  Raises:
    InteropError: listing missing, unexpected or mis-shaped keys.
  """
  if isinstance(state_dict_or_path, str):
    state_dict = load_pth(state_dict_or_path)
  else:
    state_dict = to_numpy(state_dict_of(state_dict_or_path, 'teacher'))
  state_dict = strip_prefixes(state_dict)
  if isinstance(module, DINOHead):
    state_dict = _head_keys(state_dict, module)
    if module.weight_norm:  # computed from weight_v and g, never stored
      state_dict.pop('last_layer.weight', None)
    state_dict = {
      k: v
      for k, v in state_dict.items()
      if not k.endswith('num_batches_tracked')
    }
  else:
    state_dict = {
      k: v for k, v in state_dict.items() if not k.startswith('head.')
    }
  if isinstance(module, ResNet):  # torchvision's counters and classifier
    state_dict = {
      k: v
      for k, v in state_dict.items()
      if not (k.endswith('num_batches_tracked') or k.startswith('fc.'))
    }
  if _scanned(module):  # blocks.{i}.* map to blocks_{i}, then stacked
    return vit_lib.stack_blocks(
      from_pytorch(state_dict, module.clone(scan_blocks=False))
    )
  abstract, rules = _abstract_variables(module, state_dict)
  used, missing, bad_shape, out = set(), [], [], {}
  for collection, tree in abstract.items():
    flat = {}
    for path, leaf in _flat(tree).items():
      key, transform = _torch_key(path, rules, collection)
      if key not in state_dict:
        missing.append(key)
        continue
      value = _inverse(transform, np.asarray(state_dict[key]))
      used.add(key)
      if value.shape != leaf.shape:
        bad_shape.append(
          f'{key}: checkpoint {tuple(state_dict[key].shape)}'
          f', module expects {_torch_shape(transform, leaf)}'
        )
        continue
      flat[tuple(path.split('/'))] = jnp.asarray(value, leaf.dtype)
    out[collection] = flax.traverse_util.unflatten_dict(flat)
  unexpected = sorted(set(state_dict) - used)
  if isinstance(module, DINOHead) and module.norm_last_layer:
    # (no weight_g without weight norm: it is then unexpected)
    g = state_dict.get('last_layer.weight_g')
    if g is not None:
      used.add('last_layer.weight_g')
      unexpected = [k for k in unexpected if k != 'last_layer.weight_g']
      if not np.allclose(g, 1.0):
        raise InteropError(
          'the checkpoint has a trained last_layer.weight_g (not all 1): '
          'build the head with norm_last_layer=False'
        )
  if missing or unexpected or bad_shape:
    parts = []
    for name, keys in (
      ('missing', missing),
      ('unexpected', unexpected),
      ('mis-shaped', bad_shape),
    ):
      if keys:
        parts.append(
          f'{name} ({len(keys)}): '
          + ', '.join(keys[:20])
          + (' ...' if len(keys) > 20 else '')
        )
    raise InteropError(
      f'checkpoint does not fit {type(module).__name__}: ' + '; '.join(parts)
    )
  return out


def _scanned(module) -> bool:
  """A ViT with model.scan_blocks: its blocks' parameters stacked."""
  return isinstance(module, VisionTransformer) and module.scan_blocks


def _torch_shape(transform, leaf):
  shape = leaf.shape
  if transform is _T:
    return tuple(reversed(shape))
  if transform is not None:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def to_pytorch(variables: dict, module) -> dict[str, np.ndarray]:
  """Official-name numpy arrays for ``module``'s variables.

  A head with ``norm_last_layer`` exports ``last_layer.weight_g`` as ones
  [K, 1]; ``weight_v`` is exported as stored (unnormalized).
  """
  if _scanned(module):  # blocks -> blocks_{i} -> blocks.{i}.*
    return to_pytorch(
      vit_lib.unstack_blocks(variables), module.clone(scan_blocks=False)
    )
  _, rules = _abstract_variables(module)
  out = {}
  for collection, tree in variables.items():
    for path, value in _flat(tree).items():
      key, transform = _torch_key(path, rules, collection)
      value = np.asarray(value, np.float32)
      out[key] = transform(value) if transform is not None else value
  if (
    isinstance(module, DINOHead)
    and module.weight_norm
    and 'last_layer.weight_g' not in out
  ):
    k = out['last_layer.weight_v'].shape[0]
    out['last_layer.weight_g'] = np.ones((k, 1), np.float32)
  for key in [k for k in out if k.endswith('.running_mean')]:
    # torch BatchNorm's counter (unused with a momentum): strict loads need it.
    out[key[: -len('running_mean')] + 'num_batches_tracked'] = np.zeros(
      (), np.int64
    )
  return out


def head_overrides(state_dict, config) -> list[str]:
  """The ``--config.model.*`` overrides that give the file's head.

  Read from the head's keys and shapes (``head.mlp.N``, ``head.last_layer``):
  depth, hidden width, BatchNorm, weight norm and K; only the fields where
  the config differs. Empty when the file has no head or the config fits.
  """
  try:
    keys = _head_keys(strip_prefixes(to_numpy(state_dict)), None)
  except (AttributeError, TypeError):
    return []
  linears = sorted(
    int(k.split('.')[1])
    for k, v in keys.items()
    if k.startswith('mlp.') and k.endswith('.weight') and np.ndim(v) == 2
  )
  last = keys.get('last_layer.weight_v', keys.get('last_layer.weight'))
  if not linears or last is None:
    return []
  m = config.model
  file = {
    'head_nlayers': len(linears),
    'use_bn_in_head': any(k.endswith('running_mean') for k in keys),
    'head_weight_norm': 'last_layer.weight_v' in keys,
    'out_dim': int(np.shape(last)[0]),
  }
  if len(linears) > 1:
    file['head_hidden_dim'] = int(np.shape(keys[f'mlp.{linears[0]}.weight'])[0])
  file['head_bottleneck_dim'] = int(np.shape(last)[1])
  out = []
  for name, value in file.items():
    if m.get(name) != value:
      text = str(value).lower() if isinstance(value, bool) else str(value)
      out.append(f'--config.model.{name}={text}')
  return out
