"""The data pipeline's threads: no process, nothing in /dev/shm.

grain's worker processes hand batches over in POSIX shared memory; a
segment nobody unlinks stays in /dev/shm (RAM) until the machine reboots,
and a SIGKILL to the process group also kills the resource tracker that
would unlink it. ``pipeline.read`` decodes on grain's threads instead
(docs/cpu-performance.md): no process to start or stop, no shared memory,
so a run killed outright leaves nothing behind (README, Resuming).
"""

from multiprocessing import shared_memory
from unittest import mock

import numpy as np
import psutil
from absl.testing import absltest, parameterized

from dino_jax.data import pipeline


class _Source:
  """28 px images, label == index."""

  def __len__(self):
    return 64

  def __getitem__(self, i):
    return {'image': np.full((28, 28, 3), i, np.uint8), 'label': i}


def _batches(num_workers: int, count: int = 12) -> list[dict]:
  ds = pipeline.train_dataset(
    _Source(), batch_size=8, canvas_size=28, seed=3, num_workers=num_workers
  )
  it = iter(ds)
  try:
    return [next(it) for _ in range(count)]  # past one epoch (8 batches)
  finally:
    it.close()


class ThreadsTest(parameterized.TestCase):
  @parameterized.parameters(0, 1, 3)
  def test_same_batches_no_process_no_shared_memory(self, num_workers):
    created = []
    init = shared_memory.SharedMemory.__init__

    def spy(self, *args, **kwargs):
      created.append((args, kwargs))
      init(self, *args, **kwargs)

    children = {p.pid for p in psutil.Process().children(recursive=True)}
    with mock.patch.object(shared_memory.SharedMemory, '__init__', spy):
      got = _batches(num_workers)
    self.assertEmpty(created)  # in-process threads: any would be seen here
    now = {p.pid for p in psutil.Process().children(recursive=True)}
    self.assertEmpty(now - children)
    # Batch k is fixed by the seed, whatever the thread count: the
    # permutation of each epoch, from the source directly.
    for k, batch in enumerate(got):
      self.assertIs(type(batch['image']), np.ndarray)
      labels = batch['label']
      self.assertLen(set(labels.tolist()), 8)
      np.testing.assert_array_equal(batch['image'][:, 0, 0, 0], labels)
      if k == 7:  # one epoch: every image once
        epoch = np.concatenate([b['label'] for b in got[:8]])
        self.assertEqual(sorted(epoch.tolist()), list(range(64)))
    reference = _batches(2)
    for a, b in zip(got, reference, strict=True):
      for key in ('image', 'size', 'label', 'skipped'):
        np.testing.assert_array_equal(a[key], b[key])


if __name__ == '__main__':
  absltest.main()
