"""Images/s of the DINO multi-crop: on device (jit) vs per image with PIL.

  python benchmarks/augment.py [--batch 32] [--images 64] [--canvas 512]

Both make 2 x 224 + 8 x 96 crops per image with the same operations
(SPEC §5.1). The PIL path does per image what torchvision's transforms do
(RandomResizedCrop -> flip -> ColorJitter -> grayscale -> GaussianBlur ->
solarize -> normalize) in this process. Prints one JSON row with both rates
and their ratio, measured in the same run.
"""

import argparse
import json
import math
import platform
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dino_jax import config as config_lib
from dino_jax.data import multicrop, pipeline

MEAN, STD = np.array(multicrop.MEAN), np.array(multicrop.STD)


def pil_random_resized_crop(rng, image, size, scale):
  w, h = image.size
  area = w * h
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = round(math.sqrt(target * aspect))
    ch = round(math.sqrt(target / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
      break
  else:
    ch, cw, top, left = h, w, 0, 0
  return image.resize(
    (size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch)
  )


def pil_color_jitter(rng, image):
  ops = [
    lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(0.6, 1.4)),
    lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(0.6, 1.4)),
    lambda im: ImageEnhance.Color(im).enhance(rng.uniform(0.8, 1.2)),
    lambda im: _pil_hue(im, rng.uniform(-0.1, 0.1)),
  ]
  rng.shuffle(ops)
  for op in ops:
    image = op(image)
  return image


def _pil_hue(image, delta):
  h, s, v = image.convert('HSV').split()
  h = Image.fromarray(
    (np.asarray(h, np.uint8) + np.uint8(int(delta * 255) % 256)).astype(
      np.uint8
    ),
    'L',
  )
  return Image.merge('HSV', (h, s, v)).convert('RGB')


def pil_crop(rng, image, size, scale, blur_p, solarize_p):
  x = pil_random_resized_crop(rng, image, size, scale)
  if rng.random() < 0.5:
    x = x.transpose(Image.FLIP_LEFT_RIGHT)
  if rng.random() < 0.8:
    x = pil_color_jitter(rng, x)
  if rng.random() < 0.2:
    x = x.convert('L').convert('RGB')
  if rng.random() <= blur_p:
    x = x.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
  if rng.random() < solarize_p:
    x = ImageOps.solarize(x, 128)
  return ((np.asarray(x, np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


def pil_multicrop(rng, image):
  crops = [
    pil_crop(rng, image, 224, (0.4, 1.0), 1.0, 0.0),
    pil_crop(rng, image, 224, (0.4, 1.0), 0.1, 0.2),
  ]
  crops += [pil_crop(rng, image, 96, (0.05, 0.4), 0.5, 0.0) for _ in range(8)]
  return crops


def make_images(n, seed=0):
  rs = np.random.RandomState(seed)
  images = []
  for i in range(n):
    h, w = (375, 500) if i % 2 else (500, 333)
    arr = rs.randint(0, 256, (h // 8, w // 8, 3)).astype(np.uint8)
    images.append(Image.fromarray(arr).resize((w, h), Image.BICUBIC))
  return images


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--images', type=int, default=64)
  parser.add_argument('--canvas', type=int, default=512)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  images = make_images(args.images)
  rng = random.Random(0)
  pil_multicrop(rng, images[0])  # warm-up
  start = time.perf_counter()
  for image in images:
    pil_multicrop(rng, image)
  pil_rate = len(images) / (time.perf_counter() - start)

  decoder = pipeline.CanvasDecoder(args.canvas)
  records = [
    decoder.map({'image': np.asarray(im)}) for im in images[: args.batch]
  ]
  batch = {
    'image': jnp.asarray(np.stack([r['image'] for r in records])),
    'size': jnp.asarray(np.stack([r['size'] for r in records])),
  }
  augment = jax.jit(multicrop.make_multicrop(config_lib.default_config().crops))
  jax.block_until_ready(augment(jax.random.key(0), batch))  # compile
  times = []
  for i in range(args.repeats):
    start = time.perf_counter()
    jax.block_until_ready(augment(jax.random.key(i + 1), batch))
    times.append(time.perf_counter() - start)
  jax_rate = args.batch / min(times)
  print(
    json.dumps(
      {
        'benchmark': 'augment',
        'crops': '2x224 + 8x96',
        'device': str(jax.devices()[0].device_kind),
        'backend': jax.default_backend(),
        'cpu': platform.processor() or platform.machine(),
        'batch': args.batch,
        'canvas': args.canvas,
        'jax_images_per_sec': round(jax_rate, 2),
        'pil_images_per_sec': round(pil_rate, 2),
        'ratio_jax_over_pil': round(jax_rate / pil_rate, 3),
      }
    )
  )


if __name__ == '__main__':
  main()
