"""The data workers' batches: through their pipes, none in /dev/shm.

grain's worker processes hand batches over in POSIX shared memory unless
told otherwise (``DatasetOptions.min_shm_size``); a segment nobody unlinks
stays in /dev/shm (RAM) until the machine reboots, and a SIGKILL to the
process group kills the resource tracker that would unlink it.
``pipeline.prefetch`` tells the workers to pickle batches through their
pipes instead, so a run killed outright leaves no batch behind (README,
Resuming), with no private name of CPython or grain.
"""

import grain
import numpy as np
from absl.testing import absltest
from grain._src.python.ipc import shared_memory_array

from dino_jax.data import pipeline


class _Source:
  """28 px images, label == index."""

  def __len__(self):
    return 64

  def __getitem__(self, i):
    return {'image': np.full((28, 28, 3), i, np.uint8), 'label': i}


def _batches(it, count: int) -> list[dict]:
  return [next(it) for _ in range(count)]


class NoSharedMemoryTest(absltest.TestCase):
  def test_worker_batches_are_plain_arrays_equal_to_in_process(self):
    kw = dict(batch_size=8, canvas_size=28, seed=3)
    it = iter(pipeline.train_dataset(_Source(), num_workers=2, **kw))
    try:
      got = _batches(it, 5)
    finally:
      it.close()
    want = _batches(iter(pipeline.train_dataset(_Source(), **kw)), 5)
    for a, b in zip(got, want, strict=True):
      for key in ('image', 'size', 'label', 'skipped'):
        # Not grain's SharedMemoryArray (an ndarray subclass): unpickled.
        self.assertIs(type(a[key]), np.ndarray, key)
        np.testing.assert_array_equal(a[key], b[key])

  def test_grain_as_shipped_would_use_shared_memory(self):
    # The test above can fail: without the option, the same workers'
    # batches come back in shared memory segments.
    ds = pipeline.train_batches(_Source(), batch_size=8, canvas_size=28, seed=3)
    ds = ds.to_iter_dataset().mp_prefetch(
      grain.MultiprocessingOptions(num_workers=1)
    )
    it = iter(ds)
    try:
      batch = next(it)
      self.assertIsInstance(
        batch['image'], shared_memory_array.SharedMemoryArray
      )
      del batch
    finally:
      it.close()


if __name__ == '__main__':
  absltest.main()
