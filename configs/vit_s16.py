"""ViT-S/16 with the official DINO defaults (main_dino.py, SPEC §0).

  python -m dino_jax.main --config=configs/vit_s16.py --workdir=/tmp/vit_s16

Global batch 1024, 100 epochs, K = 65536, ImageNet-1k via TFDS
(`tfds build imagenet2012 --file_format=array_record` with the manual files),
or an ImageFolder: --config.data.source=imagefolder --config.data.path=ROOT.
Official reference: 100 epochs at batch 512 on 8 GPUs, 1.75 days, k-NN 69.3,
linear 74.0 (SPEC §8). `:smoke` runs a few steps on synthetic data.
On a GPU or TPU the model computes in bfloat16 with fused attention
(parameters, loss and center in float32); on a CPU in float32. Set
--config.model.dtype=float32 for float32 everywhere (docs/precision.md).
"""

from dino_jax.config import default_config


def get_config(arg: str | None = None):
  config = default_config()
  # bfloat16 compute and fused attention on gpu/tpu, float32 and einsum on
  # cpu (docs/precision.md; official: fp16 autocast).
  config.model.dtype = 'auto'
  config.model.attention = 'auto'
  config.eval.test_split = 'validation'
  if arg == 'smoke':
    config.data.source = 'synthetic'
    config.data.canvas_size = 64
    config.batch_size = 8
    config.total_steps = 2
    config.steps_per_epoch = 10
    config.checkpoint_every_steps = 2
    config.log_every_steps = 1
    config.eval.knn = False
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use smoke')
  return config
