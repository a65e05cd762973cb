"""Slow float64 numpy references written from SPEC, shared by tests."""

import math

import numpy as np

_erf = np.vectorize(math.erf)


def gelu(x):
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def cubic_matrix(n_in, n_out):
  """SPEC §2.4: [n_out, n_in] weights, Keys A=-0.75, scale (n_out+0.1)/n_in."""
  a = -0.75

  def w(x):
    x = abs(x)
    if x <= 1:
      return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
      return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0

  m = np.zeros((n_out, n_in))
  for o in range(n_out):
    s = (o + 0.5) * n_in / (n_out + 0.1) - 0.5
    i0 = math.floor(s)
    t = s - i0
    for k, weight in zip(
      (-1, 0, 1, 2), (w(t + 1), w(t), w(1 - t), w(2 - t)), strict=True
    ):
      m[o, min(max(i0 + k, 0), n_in - 1)] += weight
  return m


def interpolate_pos_embed(pos, grid_h, grid_w, height, width):
  pos = np.asarray(pos, np.float64)
  n = pos.shape[1] - 1
  if n == grid_h * grid_w and height == width:
    return pos
  side = math.isqrt(n)
  grid = pos[0, 1:].reshape(side, side, -1)
  my, mx = cubic_matrix(side, grid_h), cubic_matrix(side, grid_w)
  out = np.einsum('ai,ijd,bj->abd', my, grid, mx)
  return np.concatenate([pos[:, :1], out.reshape(1, grid_h * grid_w, -1)], 1)


def _np(tree):
  if isinstance(tree, dict):
    return {k: _np(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


def vit_tokens(params, images, patch_size, num_heads, return_attention=False):
  """ViT forward (SPEC §2.2). Returns all tokens after the final norm."""
  params = _np(params)
  images = np.asarray(images, np.float64)
  p = patch_size
  b, height, width, c = images.shape
  gh, gw = height // p, width // p
  patches = images[:, : gh * p, : gw * p].reshape(b, gh, p, gw, p, c)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
  pe = params['patch_embed']
  x = patches @ pe['kernel'].reshape(p * p * c, -1) + pe['bias']
  d = x.shape[-1]
  cls = np.broadcast_to(params['cls_token'], (b, 1, d))
  x = np.concatenate([cls, x], 1)
  x = x + interpolate_pos_embed(params['pos_embed'], gh, gw, height, width)
  depth = len([k for k in params if k.startswith('blocks_')])
  hd = d // num_heads
  for i in range(depth):
    blk = params[f'blocks_{i}']
    y = layer_norm(x, blk['norm1']['scale'], blk['norm1']['bias'])
    qkv = y @ blk['attn']['qkv']['kernel'] + blk['attn']['qkv']['bias']
    t = qkv.shape[1]
    qkv = qkv.reshape(b, t, 3, num_heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, T, hd]
    attn = softmax(q @ k.transpose(0, 1, 3, 2) * hd**-0.5)
    if return_attention and i == depth - 1:
      return attn
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    y = y @ blk['attn']['proj']['kernel'] + blk['attn']['proj']['bias']
    x = x + y
    y = layer_norm(x, blk['norm2']['scale'], blk['norm2']['bias'])
    y = gelu(y @ blk['mlp']['fc1']['kernel'] + blk['mlp']['fc1']['bias'])
    x = x + y @ blk['mlp']['fc2']['kernel'] + blk['mlp']['fc2']['bias']
  return layer_norm(x, params['norm']['scale'], params['norm']['bias'])


def dino_head(params, x, nlayers=3):
  params = _np(params)
  x = np.asarray(x, np.float64)
  for i in range(0, 2 * (nlayers - 1), 2):
    x = gelu(x @ params[f'mlp_{i}']['kernel'] + params[f'mlp_{i}']['bias'])
  last = params[f'mlp_{2 * (nlayers - 1)}']
  x = x @ last['kernel'] + last['bias']
  x = x / max_norm(x)
  v = params['last_layer']['weight_v']
  w = v / np.linalg.norm(v, axis=0, keepdims=True)
  if 'weight_g' in params['last_layer']:
    w = w * params['last_layer']['weight_g']
  return x @ w


def max_norm(x):
  return np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def random_resized_crop_box(rng, h, w, scale, ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop.get_params (SPEC §5.2), Python floats."""
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw = round(math.sqrt(target * aspect))
    ch = round(math.sqrt(target / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
  in_ratio = w / h
  if in_ratio < ratio[0]:
    cw, ch = w, round(w / ratio[0])
  elif in_ratio > ratio[1]:
    ch, cw = h, round(h * ratio[1])
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def ks_statistic(a, b):
  """Two-sample Kolmogorov-Smirnov statistic."""
  a, b = np.sort(a), np.sort(b)
  grid = np.concatenate([a, b])
  cdf_a = np.searchsorted(a, grid, side='right') / len(a)
  cdf_b = np.searchsorted(b, grid, side='right') / len(b)
  return np.abs(cdf_a - cdf_b).max()
