"""Flax models: the DINO ViT and projection head."""

from dino_jax.models.head import DINOHead, MultiCropModel, WeightNormLinear
from dino_jax.models.vit import (
  VARIANTS,
  VisionTransformer,
  interpolate_pos_embed,
  vit_base,
  vit_small,
  vit_tiny,
)

__all__ = [
  'DINOHead',
  'MultiCropModel',
  'VARIANTS',
  'VisionTransformer',
  'WeightNormLinear',
  'interpolate_pos_embed',
  'vit_base',
  'vit_small',
  'vit_tiny',
]
