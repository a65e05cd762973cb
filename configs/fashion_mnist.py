"""The demo: a small ViT learns Fashion-MNIST without labels on a CPU.

  python -m dino_jax.main --config=configs/fashion_mnist.py \
      --workdir=/tmp/dino_fashion_mnist

Data: /usr/share/datasets/fashion-mnist (Debian `dataset-fashion-mnist`).
At the end: weighted k-NN on the test set (training set as memory) for the
trained model, the same model at random init and raw pixels, and attention
maps of a few test images in WORKDIR/eval/attention. See README for the
measured time and accuracies on a 2-core CPU.
"""

from dino_jax.config import default_config


def get_config():
  config = default_config()
  config.batch_size = 128
  # Short "epochs" of 72 steps (9,216 images) so that the official schedule
  # shapes (warmup, cosine lr/wd/momentum, frozen last layer) fit a 360-step
  # run: 46,080 images, under one pass over the 60,000 training images.
  config.steps_per_epoch = 72
  config.epochs = 5
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  config.model.patch_size = 4
  config.model.img_size = 28
  config.model.embed_dim = 64
  config.model.depth = 4
  config.model.num_heads = 4
  config.model.drop_path_rate = 0.0
  config.model.out_dim = 1024
  config.model.head_hidden_dim = 512
  config.model.head_bottleneck_dim = 128
  config.optim.lr = 2e-3  # per 256: peak 1e-3 at batch 128
  config.optim.warmup_epochs = 1
  # The last layer (random prototypes) stays frozen for the whole run: with
  # so few steps, unfreezing it drove the teacher towards uniform outputs.
  config.optim.freeze_last_layer = 5
  config.optim.momentum_teacher = 0.99
  config.crops.global_size = 28
  config.crops.local_size = 12
  config.crops.local_number = 4
  # Blur scaled to the 28 px images (officially 0.1-2.0 px at 224/96 px).
  config.crops.blur_sigma = (0.1, 0.3)
  config.data.source = 'fashion_mnist'
  config.data.canvas_size = 28
  config.data.num_workers = 0
  config.eval.test_split = 'test'
  config.eval.resize_size = 28
  config.eval.crop_size = 28
  config.eval.batch_size = 1000
  config.eval.ks = (10, 20, 100, 200)
  config.eval.baselines = True
  config.eval.attention_images = 4
  return config
