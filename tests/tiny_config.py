"""A tiny model on synthetic data, for end-to-end tests of the CLI."""

from dino_jax.config import default_config


def get_config():
  c = default_config()
  c.model.embed_dim = 32
  c.model.depth = 2
  c.model.num_heads = 2
  c.model.patch_size = 8
  c.model.img_size = 32
  c.model.out_dim = 64
  c.model.head_hidden_dim = 64
  c.model.head_bottleneck_dim = 16
  c.crops.global_size = 32
  c.crops.local_size = 16
  c.crops.local_number = 2
  c.data.source = 'synthetic'
  c.data.synthetic_size = 64
  c.data.canvas_size = 40
  c.data.num_workers = 0
  c.batch_size = 8
  c.epochs = 2
  c.optim.warmup_epochs = 1
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.eval.knn = True
  c.eval.train_split = 'train'
  c.eval.test_split = 'train'
  c.eval.max_test_images = 16
  c.eval.resize_size = 32
  c.eval.crop_size = 32
  c.eval.batch_size = 8
  c.eval.ks = (2, 4)
  c.eval.attention_images = 1
  return c
