"""ViT-B/16 with the released training arguments (SPEC §4.8).

  python -m dino_jax.main --config=configs/vit_b16.py --workdir=/tmp/vit_b16

Batch 1024 (32 x 32), 400 epochs, lr 0.00075, teacher temperature 0.04 ->
0.07 over 50 epochs, clip 0.3, min lr 2e-6, freeze the last layer 3 epochs,
crops (0.25, 1) and 10 x (0.05, 0.25). Official: k-NN 76.1, linear 78.2.
bfloat16 compute on GPU/TPU (docs/precision.md); the released run was fp32:
--config.model.dtype=float32.
"""

from dino_jax.config import default_config


def get_config():
  config = default_config()
  config.model.arch = 'vit_base'
  config.epochs = 400
  config.optim.lr = 0.00075
  config.optim.min_lr = 2e-6
  config.optim.clip_grad = 0.3
  config.optim.freeze_last_layer = 3
  config.loss.teacher_temp = 0.07
  config.loss.warmup_teacher_temp_epochs = 50
  config.crops.global_scale = (0.25, 1.0)
  config.crops.local_number = 10
  config.crops.local_scale = (0.05, 0.25)
  # bfloat16 compute and fused attention on gpu/tpu, float32 and einsum on
  # cpu (docs/precision.md; official: fp16 autocast).
  config.model.dtype = 'auto'
  config.model.attention = 'auto'
  config.eval.test_split = 'validation'
  return config
