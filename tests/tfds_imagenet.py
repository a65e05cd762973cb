"""A tiny ``imagenet2012`` built by TFDS itself: ArrayRecord, JPEG images.

The builder subclasses TFDS's own imagenet2012 builder and keeps its
``_info`` (``image`` JPEG, ``label`` over the 1,000 ImageNet classes,
``file_name``) and version, so the files carry the real layout and
``tfds.data_source('imagenet2012', data_dir=...)`` reads them through the
real builder class, as a training run on ImageNet does. Only the examples
differ: a few random 32x40 JPEGs per split, instead of the manual download.
Built without TensorFlow (TFDS writes ArrayRecord itself).
"""

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

# Images per split. 64 training images, as the synthetic data of
# tests/tiny_config.py: a run on them has the same steps per epoch, hence the
# same compiled step, which the suite's compilation cache then holds once
# (tests/test_gcs.py's pod rehearsal, tests/test_launch.py's pods).
TRAIN, VALIDATION = 64, 8
CLASSES = 4  # labels 0..3 of the 1,000


class TinyImagenet2012(
  tfds.builder_cls('imagenet2012'), skip_registration=True
):
  """imagenet2012 5.1.0's features and splits with random examples."""

  name = 'imagenet2012'

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {
      'train': self._generate_examples(TRAIN, seed=0),
      'validation': self._generate_examples(VALIDATION, seed=1000),
    }

  def _generate_examples(self, count, seed):
    for i in range(count):
      pixels = np.random.RandomState(seed + i).randint(
        0, 256, (32, 40, 3), np.uint8
      )
      data = io.BytesIO()
      Image.fromarray(pixels).save(data, format='JPEG')
      yield (
        f'{seed + i}',
        {
          'image': data.getvalue(),
          'label': i % CLASSES,
          'file_name': f'n{seed + i:08d}_{i}.JPEG',
        },
      )


def build(data_dir: str) -> str:
  """Builds into the local ``data_dir``; returns the version folder.

  TFDS cannot build straight into a bucket: build locally, then copy
  ``DATA_DIR/imagenet2012`` (as README says for the real one).
  """
  tfds.display_progress_bar(False)
  builder = TinyImagenet2012(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return os.path.join(data_dir, 'imagenet2012', str(builder.version))


def upload(version_dir: str, data_dir_url: str) -> None:
  """Copies a built version folder under ``DATA_DIR_URL/imagenet2012/``."""
  from dino_jax import storage

  version = os.path.basename(version_dir)
  for name in sorted(os.listdir(version_dir)):
    with open(os.path.join(version_dir, name), 'rb') as f:
      storage.write_bytes(
        f'{data_dir_url}/imagenet2012/{version}/{name}', f.read()
      )
