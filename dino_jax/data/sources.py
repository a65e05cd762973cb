"""Random-access data sources: ``len(source)`` and ``source[i] -> dict``.

Records hold one of ``path`` (a file to decode), ``image`` (uint8 array) or
``bytes`` (encoded image), and ``label`` (int; -1 when the data has none).
Labels are only used by evaluation.
"""

import gzip
import os
import struct
import time

import ml_collections
import numpy as np

from dino_jax import storage

# torchvision's IMG_EXTENSIONS.
IMG_EXTENSIONS = (
  '.jpg',
  '.jpeg',
  '.png',
  '.ppm',
  '.bmp',
  '.pgm',
  '.tif',
  '.tiff',
  '.webp',
)
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = (
  'T-shirt/top',
  'Trouser',
  'Pullover',
  'Dress',
  'Coat',
  'Sandal',
  'Shirt',
  'Sneaker',
  'Bag',
  'Ankle boot',
)


class DataError(ValueError):
  """A data source cannot be opened; the message says what to do."""


class ImageFolderSource:
  """``root/class/xxx.jpg`` (classes sorted, as torchvision) or a flat folder.

  With class subfolders, labels are the sorted class indices; a folder of
  images with no subfolders is accepted too (labels -1). Files without an
  image extension are skipped and counted in ``skipped``. ``root`` may be a
  URL (``gs://bucket/imagenet/train``): the listing and the reads go through
  ``dino_jax.storage``, and records then carry the file's bytes.
  """

  def __init__(self, root: str):
    self.remote = storage.is_remote(root)
    try:
      storage.check_reachable(root, 'data.path')
      top = storage.as_path(root)
      if not top.is_dir():
        raise DataError(f'ImageFolder root {root!r} is not a directory')
      entries = sorted(top.iterdir(), key=lambda p: p.name)
      classes = [e for e in entries if e.is_dir()]
      self.classes = [c.name for c in classes]
      self.skipped = 0
      self.samples: list[tuple[str, int]] = []
      if classes:
        for label, folder in enumerate(classes):
          for dirpath, filenames in storage.walk(os.fspath(folder)):
            self._add(dirpath, filenames, label)
      else:
        files = [e.name for e in entries if self.remote or e.is_file()]
        self._add(root, files, -1)
    except storage.StorageError as e:
      raise DataError(str(e)) from e
    if not self.samples:
      raise DataError(
        f'no images found in {root!r} (looked for {IMG_EXTENSIONS} in '
        f'{len(classes)} class folders'
        f'{" " + str(self.classes[:5]) if classes else ""} or at the top '
        'level)'
      )

  def _add(self, dirpath: str, filenames: list[str], label: int):
    join = storage.join if self.remote else os.path.join
    for name in filenames:
      if name.lower().endswith(IMG_EXTENSIONS):
        self.samples.append((join(dirpath, name), label))
      else:
        self.skipped += 1

  def __len__(self) -> int:
    return len(self.samples)

  def __getitem__(self, index: int) -> dict:
    path, label = self.samples[index]
    if self.remote:  # the decoder opens local paths only
      return {'bytes': storage.as_path(path).read_bytes(), 'label': label}
    return {'path': path, 'label': label}

  def __repr__(self):
    return (
      f'ImageFolderSource({len(self)} images, {len(self.classes)} classes, '
      f'{self.skipped} non-image files skipped)'
    )


def _read_idx(path: str) -> np.ndarray:
  data = storage.as_path(path).read_bytes()
  if path.endswith('.gz'):
    data = gzip.decompress(data)
  zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise DataError(f'{path!r} is not an IDX file of uint8')
  shape = struct.unpack('>' + 'I' * ndim, data[4 : 4 + 4 * ndim])
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  return array.reshape(shape)


class FashionMNISTSource:
  """Fashion-MNIST from its IDX files (Debian ``dataset-fashion-mnist``)."""

  FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
  }

  def __init__(self, split: str = 'train', path: str = ''):
    root = path or FASHION_MNIST_DIR
    if split not in self.FILES:
      raise DataError(
        f'Fashion-MNIST split {split!r} unknown; use one of {tuple(self.FILES)}'
      )
    found = []
    for stem in self.FILES[split]:
      candidates = [storage.join(root, stem + ext) for ext in ('.gz', '')]
      existing = [c for c in candidates if storage.exists(c, 'data.path')]
      if not existing:
        raise DataError(
          f'Fashion-MNIST file {stem}(.gz) not found in {root!r}. Install '
          'it with `apt-get install dataset-fashion-mnist` or point '
          'data.path at a folder holding the IDX files.'
        )
      found.append(existing[0])
    self.images = _read_idx(found[0])  # [N, 28, 28]
    self.labels = _read_idx(found[1]).astype(np.int64)
    self.classes = FASHION_MNIST_CLASSES
    self.root = root

  def __repr__(self):
    return f'FashionMNISTSource({len(self)} images from {self.root})'

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {'image': self.images[index], 'label': int(self.labels[index])}


class TFDSSource:
  """Any TFDS image dataset through ``tfds.data_source`` (ArrayRecord)."""

  def __init__(self, name: str, split: str = 'train', data_dir: str = ''):
    import tensorflow_datasets as tfds  # heavy import, only when used

    if data_dir:
      folder = storage.join(data_dir, name.split(':')[0].split('/')[0])
      try:
        storage.check_reachable(data_dir, 'data.path')
        found = storage.exists(folder, 'data.path')
      except storage.StorageError as e:
        raise DataError(str(e)) from e
      if not found:
        raise DataError(
          f'no TFDS dataset {name!r} in data.path={data_dir} (nothing at '
          f'{folder}); build it (tfds build {name} --file_format='
          'array_record --data_dir=DIR), then copy DIR/'
          f'{name.split(":")[0]} there'
        )
    try:
      # download=False: a missing dataset is an error here, not a build
      # (imagenet2012 needs a manual download; a build to a bucket fails).
      self.source = tfds.data_source(
        name, split=split, data_dir=data_dir or None, download=False
      )
    except Exception as e:  # tfds raises many types; all mean "can't open"
      reason = ' '.join(str(e).split())[:300]
      raise DataError(
        f'cannot open TFDS dataset {name!r} split {split!r} '
        f'(data_dir={data_dir or "default"}): {reason}. Prepare it first, e.g. '
        f'`tfds build {name} --file_format=array_record`.'
      ) from e
    info = getattr(self.source, 'dataset_info', None)
    self.classes = ()
    if info is not None and 'label' in info.features:
      self.classes = tuple(info.features['label'].names)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    record = self.source[index]
    return {'image': record['image'], 'label': int(record.get('label', -1))}


class SyntheticSource:
  """Deterministic random images, for benchmarks and tests.

  ``delay`` seconds per read simulate slow storage (tests of signals that
  arrive while the training loop waits for data).
  """

  def __init__(
    self,
    size: int = 1024,
    image_size: int = 64,
    seed: int = 0,
    delay: float = 0.0,
  ):
    self.size, self.image_size, self.seed = size, image_size, seed
    self.delay = delay
    self.classes = tuple(str(i) for i in range(10))

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    if self.delay > 0:
      time.sleep(self.delay)
    rs = np.random.RandomState((self.seed * 1_000_003 + index) % 2**32)
    image = rs.randint(0, 256, (self.image_size, self.image_size, 3))
    return {'image': image.astype(np.uint8), 'label': index % 10}

  def __repr__(self):
    return f'SyntheticSource({self.size} images of {self.image_size}px)'


def make_source(data: ml_collections.ConfigDict, split: str | None = None):
  """The source named by the ``data`` config group."""
  split = split or data.split
  if data.source == 'imagefolder':
    if not data.path:
      raise DataError('data.source=imagefolder needs data.path=/path/to/root')
    try:
      storage.check_reachable(data.path, 'data.path')
      with_split = storage.join(data.path, split)
      root = with_split if storage.as_path(with_split).is_dir() else data.path
    except storage.StorageError as e:
      raise DataError(str(e)) from e
    return ImageFolderSource(root)
  if data.source == 'fashion_mnist':
    return FashionMNISTSource(split, data.path)
  if data.source == 'tfds':
    return TFDSSource(data.name, split, data.path)
  if data.source == 'synthetic':
    return SyntheticSource(
      data.synthetic_size,
      min(data.canvas_size, 64),
      delay=data.synthetic_delay,
    )
  raise DataError(
    f"data.source={data.source!r} unknown; use 'tfds', 'imagefolder', "
    "'fashion_mnist' or 'synthetic'"
  )
