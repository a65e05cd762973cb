"""A PyTorch ViT and DINO head written from SPEC §2, for parity tests only."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.scale = (dim // heads) ** -0.5
    self.qkv = nn.Linear(dim, 3 * dim, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, N, hd]
    attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, c)
    return self.proj(out), attn


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, 4 * dim)

  def forward(self, x, return_attention=False):
    y, attn = self.attn(self.norm1(x))
    if return_attention:
      return attn
    x = x + y
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class ViT(nn.Module):
  def __init__(self, patch=16, dim=64, depth=3, heads=4, img_size=224):
    super().__init__()
    self.patch = patch
    n = (img_size // patch) ** 2
    self.patch_embed = PatchEmbed(patch, dim)
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
    self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def pos(self, h, w):
    n = self.pos_embed.shape[1] - 1
    gh, gw = h // self.patch, w // self.patch
    if gh * gw == n and h == w:
      return self.pos_embed
    side = int(math.sqrt(n))
    grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(
      grid,
      scale_factor=((gh + 0.1) / side, (gw + 0.1) / side),
      mode='bicubic',
      align_corners=False,
    )
    assert grid.shape[-2:] == (gh, gw)
    grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
    return torch.cat([self.pos_embed[:, :1], grid], dim=1)

  def tokens(self, x):  # x: [B, 3, H, W]
    b, _, h, w = x.shape
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
    return x + self.pos(h, w)

  def forward(self, x):
    x = self.tokens(x)
    for block in self.blocks:
      x = block(x)
    return self.norm(x)[:, 0]

  def last_self_attention(self, x):
    x = self.tokens(x)
    for block in self.blocks[:-1]:
      x = block(x)
    return self.blocks[-1](x, return_attention=True)

  def intermediate_layers(self, x, n):
    x = self.tokens(x)
    out = []
    for i, block in enumerate(self.blocks):
      x = block(x)
      if i >= len(self.blocks) - n:
        out.append(self.norm(x))
    return out


class Head(nn.Module):
  def __init__(self, in_dim, out_dim, hidden=48, bottleneck=16):
    super().__init__()
    self.mlp = nn.Sequential(
      nn.Linear(in_dim, hidden),
      nn.GELU(),
      nn.Linear(hidden, hidden),
      nn.GELU(),
      nn.Linear(hidden, bottleneck),
    )
    self.last_layer = nn.utils.parametrizations.weight_norm(
      nn.Linear(bottleneck, out_dim, bias=False)
    )

  def forward(self, x):
    x = F.normalize(self.mlp(x), dim=-1, p=2)
    return self.last_layer(x)
