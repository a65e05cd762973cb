"""ViT-B/8: the ViT-B/16 recipe with 8 x 8 patches (SPEC §4.8).

  python -m dino_jax.main --config=configs/vit_b8.py --workdir=/tmp/vit_b8

Official: k-NN 77.4, linear 80.1. The released arguments for this model are
not public; the ViT-B/16 recipe is the closest documented one.
"""

from configs import vit_b16


def get_config():
  config = vit_b16.get_config()
  config.model.patch_size = 8
  config.model.remat = True
  return config
