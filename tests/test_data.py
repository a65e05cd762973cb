"""Sources and the grain pipeline: bad files, shards, exact restore."""

import gzip
import os
import struct

import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest, parameterized
from PIL import Image

from dino_jax import config as config_lib
from dino_jax import parallel
from dino_jax.data import pipeline, sources


class IndexSource:
  """label == index, to check coverage."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'image': np.full((4, 5, 3), i % 256, np.uint8), 'label': i}


def write_idx(path, array):
  header = struct.pack('>HBB', 0, 0x08, array.ndim)
  header += struct.pack('>' + 'I' * array.ndim, *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def make_bad_folder(root):
  rs = np.random.RandomState(0)
  rgb = rs.randint(0, 256, (40, 30, 3)).astype(np.uint8)
  os.makedirs(os.path.join(root, 'cats'))
  os.makedirs(os.path.join(root, 'dogs', 'nested'))
  good = {
    'cats/rgb.jpg': Image.fromarray(rgb),
    'cats/gray.png': Image.fromarray(rgb[..., 0]),  # mode L
    'cats/rgba.png': Image.fromarray(
      np.concatenate([rgb, np.full((40, 30, 1), 7, np.uint8)], -1)
    ),
    'cats/palette.png': Image.fromarray(rgb).convert('P'),
    'dogs/cmyk.jpg': Image.fromarray(rgb).convert('CMYK'),
    'dogs/tiny.png': Image.fromarray(rgb[:3, :2]),  # smaller than a crop
    'dogs/nested/big.png': Image.fromarray(
      rs.randint(0, 256, (90, 45, 3)).astype(np.uint8)
    ),  # larger than the canvas
  }
  for name, image in good.items():
    image.save(os.path.join(root, name))
  open(os.path.join(root, 'dogs/empty.jpg'), 'wb').close()
  with open(os.path.join(root, 'cats/rgb.jpg'), 'rb') as f:
    data = f.read()
  with open(os.path.join(root, 'dogs/truncated.jpg'), 'wb') as f:
    f.write(data[:60])
  with open(os.path.join(root, 'dogs/garbage.png'), 'wb') as f:
    f.write(b'this is not a png at all')
  with open(os.path.join(root, 'dogs/notes.txt'), 'w') as f:
    f.write('not an image')
  return rgb


class ImageFolderTest(absltest.TestCase):
  def test_bad_files_are_converted_or_skipped(self):
    root = self.create_tempdir().full_path
    rgb = make_bad_folder(root)
    src = sources.ImageFolderSource(root)
    self.assertEqual(src.classes, ['cats', 'dogs'])
    self.assertLen(src, 10)  # 7 good + 3 undecodable; .txt not listed
    self.assertEqual(src.skipped, 1)
    labels = sorted(src[i]['label'] for i in range(len(src)))
    self.assertEqual(labels, [0] * 4 + [1] * 6)
    decoder = pipeline.CanvasDecoder(64)
    out = [decoder.map(src[i]) for i in range(len(src))]
    valid = [o for o in out if o['valid']]
    self.assertLen(valid, 7)
    self.assertEqual(decoder.bad, 3)
    self.assertEqual(decoder.downscaled, 1)
    by_path = {
      os.path.relpath(src[i]['path'], root): o for i, o in enumerate(out)
    }
    gray = by_path['cats/gray.png']
    np.testing.assert_array_equal(gray['size'], [40, 30])
    np.testing.assert_array_equal(gray['image'][:40, :30, 1], rgb[..., 0])
    np.testing.assert_array_equal(gray['image'][:40, :30, 2], rgb[..., 0])
    np.testing.assert_array_equal(gray['image'][40:], 0)  # canvas padding
    rgba = by_path['cats/rgba.png']
    np.testing.assert_array_equal(rgba['image'][:40, :30], rgb)
    np.testing.assert_array_equal(by_path['dogs/tiny.png']['size'], [3, 2])
    big = by_path['dogs/nested/big.png']
    np.testing.assert_array_equal(big['size'], [64, 32])  # aspect kept
    for bad in ('dogs/empty.jpg', 'dogs/truncated.jpg', 'dogs/garbage.png'):
      self.assertFalse(by_path[bad]['valid'], bad)
    # Through the pipeline each bad record is replaced by the next good one:
    # an epoch keeps its 10 images, 3 of them repeats, and the bad files
    # are reported once each, by path, however often they come up.
    it = iter(
      pipeline.train_dataset(
        src,
        batch_size=10,
        canvas_size=64,
        seed=0,
      )
    )
    skipped = pipeline.SkippedFiles(src)
    with self.assertLogs(pipeline.logger, 'WARNING') as logs:
      for _ in range(3):  # three epochs
        batch = next(it)
        self.assertEqual(batch['image'].shape, (10, 64, 64, 3))
        self.assertTrue(np.all(batch['size'] > 1))
        skipped.update(batch.pop('skipped'))
    bad_paths = {
      os.path.join(root, p)
      for p in ('dogs/empty.jpg', 'dogs/truncated.jpg', 'dogs/garbage.png')
    }
    self.assertEqual({src[j]['path'] for j in skipped.seen}, bad_paths)
    self.assertLen(logs.output, 3)
    for path in bad_paths:
      self.assertLen([x for x in logs.output if path in x], 1)

  def test_undecodable_folder_fails_with_one_error(self):
    root = self.create_tempdir().full_path
    for i in range(5):
      with open(os.path.join(root, f'{i}.jpg'), 'wb') as f:
        f.write(b'not a jpeg')
    it = iter(
      pipeline.train_dataset(
        sources.ImageFolderSource(root),
        batch_size=2,
        canvas_size=16,
        seed=0,
      )
    )
    with self.assertRaisesRegex(
      sources.DataError, r'none of 5 consecutive images decodes \(from /'
    ):
      next(it)

  def test_flat_folder_and_errors(self):
    root = self.create_tempdir().full_path
    for i in range(3):
      Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(
        os.path.join(root, f'{i}.png')
      )
    src = sources.ImageFolderSource(root)
    self.assertLen(src, 3)
    self.assertEqual(src[0]['label'], -1)
    empty = self.create_tempdir().full_path
    with self.assertRaisesRegex(sources.DataError, 'no images found'):
      sources.ImageFolderSource(empty)
    with self.assertRaisesRegex(sources.DataError, 'not a directory'):
      sources.ImageFolderSource(os.path.join(empty, 'missing'))

  def test_make_source_errors(self):
    data = config_lib.default_config().data
    data.source = 'imagefolder'
    data.path = ''
    with self.assertRaisesRegex(sources.DataError, 'data.path'):
      sources.make_source(data)
    data.source = 'tfds'
    data.name = 'no_such_dataset_xyz'
    with self.assertRaisesRegex(sources.DataError, 'no_such_dataset_xyz'):
      sources.make_source(data)


class OtherSourcesTest(absltest.TestCase):
  def test_fashion_mnist_idx(self):
    root = self.create_tempdir().full_path
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(os.path.join(root, 't10k-images-idx3-ubyte.gz'), images)
    write_idx(
      os.path.join(root, 't10k-labels-idx1-ubyte.gz'), np.array([4, 1, 9])
    )
    src = sources.FashionMNISTSource('test', root)
    self.assertLen(src, 3)
    np.testing.assert_array_equal(src[1]['image'], images[1])
    self.assertEqual(src[2]['label'], 9)
    out = pipeline.CanvasDecoder(32).map(src[1])
    np.testing.assert_array_equal(out['size'], [28, 28])
    np.testing.assert_array_equal(out['image'][:28, :28, 0], images[1])
    with self.assertRaisesRegex(sources.DataError, 'dataset-fashion-mnist'):
      sources.FashionMNISTSource('train', root)

  def test_tfds_mock(self):
    with tfds.testing.mock_data(
      num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE
    ):
      src = sources.TFDSSource('cifar10', 'train')
      self.assertLen(src, 12)
      it = iter(
        pipeline.train_dataset(
          src,
          batch_size=4,
          canvas_size=40,
          seed=0,
        )
      )
      batch = next(it)
    self.assertEqual(batch['image'].shape, (4, 40, 40, 3))
    np.testing.assert_array_equal(batch['size'], [[32, 32]] * 4)
    self.assertTrue(np.all((batch['label'] >= 0) & (batch['label'] < 10)))


class PipelineTest(parameterized.TestCase):
  def test_processes_supply_their_rows_of_one_global_batch(self):
    n, batch_size = 24, 12

    def labels(rows, batches=4):
      it = iter(
        pipeline.train_dataset(
          IndexSource(n),
          batch_size=batch_size,
          canvas_size=8,
          seed=3,
          rows=rows,
        )
      )
      return np.stack([next(it)['label'] for _ in range(batches)])

    whole = labels(None)  # one process: [4 batches, 12 rows]
    # An epoch (2 batches) is a permutation of the data; the next epoch
    # another one.
    self.assertEqual(sorted(whole[:2].reshape(-1).tolist()), list(range(n)))
    self.assertEqual(sorted(whole[2:].reshape(-1).tolist()), list(range(n)))
    self.assertFalse(np.array_equal(whole[2:], whole[:2]))
    # Three processes holding interleaved rows (as a mesh whose devices are
    # not grouped by process gives them) supply exactly those rows of the
    # same global batches: the run trains on the same data whatever the
    # number of processes. (Before, each process shuffled its own shard:
    # other batches.)
    for rows in ([0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11], [4, 5, 6, 7]):
      np.testing.assert_array_equal(labels(rows), whole[:, rows])
    self.assertEqual(
      parallel.process_rows(parallel.make_mesh(), 16).tolist(),
      list(range(16)),
    )

  def test_batches_do_not_depend_on_workers_and_start_anywhere(self):
    def labels(workers, start, n):
      it = iter(
        pipeline.train_dataset(
          IndexSource(50),
          batch_size=4,
          canvas_size=8,
          seed=1,
          num_workers=workers,
          start_batch=start,
        )
      )
      out = np.stack([next(it)['label'] for _ in range(n)])
      it.close()
      return out

    expected = labels(0, 0, 20)  # crosses an epoch (12 batches of 4)
    np.testing.assert_array_equal(labels(2, 0, 20), expected)
    np.testing.assert_array_equal(labels(3, 7, 13), expected[7:])
    np.testing.assert_array_equal(labels(0, 5, 15), expected[5:])

  def test_train_feed_takes_the_read_ahead_batch_then_reads_on(self):
    # The loop's feed: batch k of the config's sequence, from the step it
    # starts at, whether taken after a read ahead or read when taken; the
    # rows laid out on the mesh.
    config = config_lib.default_config()
    config.batch_size, config.seed = 8, 1
    config.data.canvas_size, config.data.num_workers = 8, 2
    mesh = parallel.make_mesh(-1, 1)  # every device of the suite
    source = IndexSource(50)
    it = iter(
      pipeline.train_dataset(
        source, batch_size=8, canvas_size=8, seed=1, start_batch=3
      )
    )
    expected = [next(it)['label'] for _ in range(4)]
    it.close()
    feed = pipeline.TrainFeed(source, config, mesh, start=3)
    got = [feed.take()]
    feed.read_ahead()
    self.assertIsNotNone(feed.ahead)
    got += [feed.take(), feed.take()]
    self.assertIsNone(feed.ahead)
    feed.read_ahead()
    got.append(feed.take())
    feed.close()
    for (skipped, batch), labels in zip(got, expected, strict=True):
      np.testing.assert_array_equal(np.asarray(batch['label']), labels)
      self.assertEqual(skipped.shape, (8, pipeline.MAX_SKIPPED_PER_IMAGE))
      self.assertNotIn('skipped', batch)
      self.assertEqual(batch['image'].shape, (8, 8, 8, 3))
      self.assertEqual(batch['image'].sharding.mesh.shape, mesh.shape)

  def test_steps_of(self):
    config = config_lib.default_config()
    config.batch_size, config.epochs = 64, 3
    config.steps_per_epoch, config.total_steps = 0, 0
    self.assertEqual(config_lib.steps_of(config, 1000), (15, 45))
    config.total_steps = 20  # a cap, not a length
    self.assertEqual(config_lib.steps_of(config, 1000), (15, 20))
    config.steps_per_epoch = 7  # fixed: the data size does not count
    self.assertEqual(config_lib.steps_of(config, 1000), (7, 20))
    config.steps_per_epoch, config.total_steps = 0, 0
    with self.assertRaisesRegex(
      config_lib.ConfigError, 'batch_size=64 exceeds the 63 images'
    ):
      config_lib.steps_of(config, 63)

  def test_too_small_dataset(self):
    with self.assertRaisesRegex(ValueError, 'fewer than one global batch'):
      pipeline.train_dataset(
        IndexSource(3),
        batch_size=4,
        canvas_size=8,
        seed=0,
      )


if __name__ == '__main__':
  absltest.main()
