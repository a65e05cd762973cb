"""Each process's share of an evaluation's items, and the results gathered.

Retrieval (images of many sizes, one at a time) and video (sequences, one
frame after another) cannot split one batch over the mesh as k-NN does
(``features.extract``). Each process instead takes every
``process_count``-th item (``share``), runs them on a local copy of the
parameters (``local_params``), and the results travel back with their
item indices (``gather_objects``, ``gather_rows``): every process ends
with all of them, in item order, whatever the process count. One process:
no copy, no collective.
"""

import pickle
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dino_jax.evaluation import features


def share(n: int) -> list[int]:
  """The item indices this process evaluates: index, index + count, ..."""
  return list(range(jax.process_index(), n, jax.process_count()))


def local_params(mesh: Mesh | None, params: Any) -> Any:
  """``params`` usable by a jitted function on this process alone.

  Several processes: the whole tree as numpy, gathered from every shard
  (a collective: every process calls it). One process: ``params`` as is
  (every shard is addressable).
  """
  if jax.process_count() == 1 or mesh is None:
    return params
  return features.gather(mesh, params)


def gather_objects(obj: Any) -> list[Any]:
  """Every process's ``obj`` (picklable), in process order, on every one.

  One collective for the sizes, one for the bytes (padded to the longest).
  """
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = multihost_utils.process_allgather(np.int64(data.size))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[: data.size] = data
  stacked = np.asarray(multihost_utils.process_allgather(padded))
  return [
    pickle.loads(stacked[i, : int(size)].tobytes())
    for i, size in enumerate(np.asarray(sizes).ravel())
  ]


def raise_first(failures: list[BaseException | None]) -> None:
  """Raises the first failure of the list (every process the same one)."""
  for failure in failures:
    if failure is not None:
      raise failure


def gather_rows(
  indices: list[int],
  rows: np.ndarray,
  n: int,
  failure: Exception | None = None,
) -> np.ndarray:
  """[n, ...] rows of all processes, row i the one of item i.

  Args:
    indices: the items this process computed (``share(n)``).
    rows: [len(indices), ...] their results.
    n: the number of items.
    failure: the error that stopped this process's share (e.g. an image
      it could not read), raised on every process after the gather: no
      process waits for one that gave up.

  Raises:
    The first process's ``failure``; ValueError: an item no process
    computed, or one computed twice.
  """
  parts = gather_objects((list(indices), np.asarray(rows), failure))
  raise_first([f for _, _, f in parts])
  order = np.concatenate([np.asarray(i, np.int64) for i, _, _ in parts])
  if len(order) != n or set(order.tolist()) != set(range(n)):
    raise ValueError(
      f'gathered {len(order)} rows for {n} items; every item must be '
      'computed by exactly one process'
    )
  stacked = np.concatenate([r for i, r, _ in parts if len(i)])
  out = np.empty_like(stacked)
  out[order] = stacked
  return out
