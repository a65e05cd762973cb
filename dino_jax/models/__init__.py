"""Flax models: the DINO ViT, the ResNet and the projection head."""

from dino_jax.models.head import DINOHead, MultiCropModel, WeightNormLinear
from dino_jax.models.resnet import ARCHS as RESNET_ARCHS
from dino_jax.models.resnet import ResNet, resnet18, resnet34, resnet50
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
  'RESNET_ARCHS',
  'ResNet',
  'VARIANTS',
  'VisionTransformer',
  'WeightNormLinear',
  'interpolate_pos_embed',
  'resnet18',
  'resnet34',
  'resnet50',
  'vit_base',
  'vit_small',
  'vit_tiny',
]
