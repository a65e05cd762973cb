"""ViT-S/8 (released model: 16 images x 64 GPUs = 1024, fp32; SPEC §4.8).

  python -m dino_jax.main --config=configs/vit_s8.py --workdir=/tmp/vit_s8

Official reference: k-NN 78.3, linear 79.7 (800 epochs). Other settings are
the official defaults; 785 tokens per global crop make it ~4x ViT-S/16.
bfloat16 compute on GPU/TPU (docs/precision.md); the released run was fp32:
--config.model.dtype=float32.
"""

from dino_jax.config import default_config


def get_config():
  config = default_config()
  config.model.patch_size = 8
  config.model.remat = True  # 785-token global crops
  # bfloat16 compute and fused attention on gpu/tpu, float32 and einsum on
  # cpu (docs/precision.md; official: fp16 autocast).
  config.model.dtype = 'auto'
  config.model.attention = 'auto'
  config.eval.test_split = 'validation'
  return config
