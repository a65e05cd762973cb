"""ResNet-50 with the official README's 100-epoch recipe (SPEC-downstream §5).

  python -m dino_jax.main --config=configs/resnet50.py --workdir=/tmp/rn50

The official command: main_dino.py --arch resnet50 --optimizer sgd --lr 0.03
--weight_decay 1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1
--local_crops_scale 0.05 0.14, on 8 GPUs x 64 images (global batch 512);
the other fields keep the official defaults (K = 65536, no BatchNorm in the
head, warmup 10 epochs, cosine to min_lr 1e-6, clip 3.0, last layer frozen
for 1 epoch, teacher momentum 0.996, 8 local crops). SGD momentum 0.9,
biases and 1-D parameters not decayed. BatchNorm statistics over the global
batch (official: SyncBatchNorm). Paper: linear 75.3, k-NN 67.5. On a GPU or
TPU the convs compute in bfloat16 (parameters, BatchNorm statistics and
normalisation in float32; official: fp16 autocast), on a CPU in float32.
`:smoke` runs a few steps of a narrow resnet18 on synthetic data.
`:released` has the head of the released
dino_resnet50_pretrain_full_checkpoint.pth, which differs from main_dino.py's:
2 layers of 4096 and a plain last layer (no weight norm), for

  python -m dino_jax.interop import dino_resnet50_pretrain_full_checkpoint.pth \
      DIR --config=configs/resnet50.py:released

(its K is read from the file's last layer: a different one is named in the
error line with the override to pass, --config.model.out_dim=K).
"""

from dino_jax.config import default_config


def get_config(arg: str | None = None):
  config = default_config()
  config.model.arch = 'resnet50'
  config.model.dtype = 'auto'  # bfloat16 on gpu/tpu, float32 on cpu
  config.batch_size = 512  # official: 8 GPUs x 64
  config.optim.name = 'sgd'
  config.optim.lr = 0.03  # per 256 images
  config.optim.weight_decay = 1e-4
  config.optim.weight_decay_end = 1e-4  # constant
  config.crops.global_scale = (0.14, 1.0)
  config.crops.local_scale = (0.05, 0.14)
  config.eval.test_split = 'validation'
  if arg == 'smoke':
    config.model.arch = 'resnet18'
    config.model.resnet_width = 8
    config.model.out_dim = 256
    config.model.head_hidden_dim = 64
    config.model.head_bottleneck_dim = 32
    config.crops.global_size = 64
    config.crops.local_size = 32
    config.crops.local_number = 2
    config.data.source = 'synthetic'
    config.data.canvas_size = 64
    config.batch_size = 8
    config.total_steps = 2
    config.steps_per_epoch = 10
    config.checkpoint_every_steps = 2
    config.log_every_steps = 1
    config.eval.knn = False
  elif arg == 'released':
    config.model.head_nlayers = 2
    config.model.head_hidden_dim = 4096
    config.model.head_weight_norm = False
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use smoke or released')
  return config
