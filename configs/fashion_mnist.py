"""The demo: a small ViT learns Fashion-MNIST without labels.

  python -m dino_jax.main --config=configs/fashion_mnist.py \
      --workdir=/tmp/dino_fashion_mnist

Variants, ``--config=configs/fashion_mnist.py:NAME``:

- ``cpu`` (the default): the Quickstart, sized for 15 minutes on a 2-core
  CPU, evaluation included.
- ``gpu``: the same recipe at batch 512, longer, with 8 data workers, for
  one GPU (bf16 and fused attention there).
- ``parity``: the recipe that ``benchmarks/convergence.py`` trains with
  dino_jax and with the official code (patch 4, 64 dims, 360 steps).
  Learning parity is measured on it, not on the tuned demo.

Data: /usr/share/datasets/fashion-mnist (Debian `dataset-fashion-mnist`).
At the end: weighted k-NN on the test set (training set as memory) for the
trained model, the same model at random init and raw pixels, and attention
maps of a few test images in WORKDIR/eval/attention. README gives measured
times and accuracies; docs/benchmarks.md has the sweeps behind the values.
"""

from dino_jax.config import default_config

VARIANTS = ('cpu', 'gpu', 'parity')


def get_config(variant: str = 'cpu'):
  if variant not in VARIANTS:
    raise ValueError(f'variant {variant!r} unknown; use one of {VARIANTS}')
  config = default_config()
  # Official values unless said: default_config holds them (SPEC).
  # Schedules: short "epochs" of steps_per_epoch batches, so that the
  # official schedule shapes (one warmup epoch here, cosine lr/wd/momentum,
  # frozen last layer) fit a run of a few hundred steps.
  config.epochs = 5
  config.optim.warmup_epochs = 1
  # A ViT for 28 px images, without stochastic depth (official 0.1: too
  # little training here to need it).
  config.model.img_size = 28
  config.model.depth = 4
  config.model.num_heads = 4
  config.model.drop_path_rate = 0.0
  # K = 1024 prototypes (official 65536) and a narrower head for 60,000
  # images; K = 256 scored the same in the sweeps.
  config.model.out_dim = 1024
  config.model.head_hidden_dim = 512
  config.model.head_bottleneck_dim = 128
  # lr per 256 images 2e-3 (official 5e-4): peak 1e-3 at batch 128. 4e-3
  # scored the same in the sweeps.
  config.optim.lr = 2e-3
  # Teacher momentum 0.99 (official 0.996) for runs of hundreds of steps;
  # 0.98 scored the same.
  config.optim.momentum_teacher = 0.99
  # The last layer (random prototypes) stays frozen for the whole run: with
  # so few steps, unfreezing it drove the teacher towards uniform outputs
  # (teacher entropy 6.4 of ln 1024 = 6.93; k-NN the same).
  config.optim.freeze_last_layer = config.epochs
  # Crops scaled to the 28 px images (official 224/96 px): 2 global crops of
  # 28 px, 4 local crops (official 8; 8 scored the same, 25 % slower); the
  # blur scaled too (officially 0.1-2.0 px at 224/96 px).
  config.crops.global_size = 28
  config.crops.local_number = 4
  config.crops.blur_sigma = (0.1, 0.3)
  config.data.source = 'fashion_mnist'
  config.data.canvas_size = 28
  config.eval.test_split = 'test'
  config.eval.resize_size = 28
  config.eval.crop_size = 28
  config.eval.batch_size = 1000
  config.eval.ks = (10, 20, 100, 200)
  config.eval.baselines = True
  config.eval.attention_images = 4
  if variant == 'parity':
    # The recipe of the 2026-11-29 comparison with the official code.
    config.batch_size = 128
    config.steps_per_epoch = 72  # 5 x 72 = 360 steps, 46,080 images
    config.model.patch_size = 4
    config.model.embed_dim = 64
    config.crops.local_size = 12
    config.data.num_workers = 0
    config.log_every_steps = 20
    config.checkpoint_every_steps = 200
    return config
  # Patch 7 (16 tokens per 28 px crop, 4 per 14 px local crop) trains twice
  # as fast as patch 4 and scored higher at equal steps; 128 dims (the
  # parity recipe has 64) scored 3-4 points higher at equal steps for 1.5x
  # the time, and 192 dims no higher than 128.
  config.model.patch_size = 7
  config.model.embed_dim = 128
  config.model.dtype = 'auto'  # float32 on CPU, bfloat16 on GPU and TPU
  config.model.attention = 'auto'
  config.crops.local_size = 14
  if variant == 'cpu':
    config.batch_size = 128
    config.steps_per_epoch = 144  # 5 x 144 = 720 steps, 92,160 images
    config.data.num_workers = 0  # the 2 cores are busy with the step
    config.log_every_steps = 20
    config.checkpoint_every_steps = 240
  else:  # gpu
    config.batch_size = 512  # peak lr 4e-3 (lr per 256 as above)
    config.steps_per_epoch = 500  # 5 x 500 = 2,500 steps, 1.28M images
    config.data.num_workers = 8
    config.log_every_steps = 100
    config.checkpoint_every_steps = 500
    config.eval_every_steps = 500
  return config
