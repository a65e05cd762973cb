"""Compiling the training program's step and the evaluation's features.

``compile_step`` lowers ``step.build_sharded_step``'s jitted step (what
``train.py`` runs) and ``compile_features`` the k-NN feature function, on a
target's mesh, with abstract arguments that carry their shardings; a
compile the target's memory refuses is a ``Compiled`` with the bytes the
compiler's message names. ``memory`` reads a compiled program's bytes per
device.
"""

import dataclasses
import math
import re
import time
from typing import Any

import jax
import ml_collections

from dino_jax import config as config_lib
from dino_jax.aot.targets import first_line

# ImageNet-1k's training images: the epoch length of a config that leaves
# ``steps_per_epoch`` to the data (the schedules' unit; the compile reads no
# data).
IMAGENET_TRAIN_IMAGES = 1281167


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """The schedules' epoch length as training derives it
  (``config.steps_of``), for ImageNet-1k's training set; one step where the
  batch exceeds it (the batch search probes such batches too)."""
  images = max(IMAGENET_TRAIN_IMAGES, config.batch_size)
  return config_lib.steps_of(config, images)[0]


def memory(compiled) -> dict[str, int]:
  """Bytes per device of a compiled program (``memory_analysis``).

  ``peak`` is XLA's peak where it reports one, else arguments + outputs +
  temporaries less the outputs that reuse donated arguments (aliases).
  """
  m = compiled.memory_analysis()
  out = {
    'arguments': int(m.argument_size_in_bytes),
    'outputs': int(m.output_size_in_bytes),
    'aliased': int(m.alias_size_in_bytes),
    'temporaries': int(m.temp_size_in_bytes),
    'code': int(m.generated_code_size_in_bytes),
  }
  total = (
    out['arguments'] + out['outputs'] - out['aliased'] + out['temporaries']
  )
  out['peak'] = int(getattr(m, 'peak_memory_in_bytes', 0) or total)
  return out


# libtpu's two RESOURCE_EXHAUSTED forms: the whole program ("Used 92.80G of
# 15.75G hbm"), or its temporaries alone, checked before the arguments are
# placed ("memory required for HLO temporaries (25.01G) exceeds ...").
_HBM_USED = re.compile(r'Used ([0-9.]+)([KMGT]?) of [0-9.]+[KMGT]? hbm')
_HBM_TEMPORARIES = re.compile(r'HLO temporaries \(([0-9.]+)([KMGT]?)\)')
_UNIT = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def hbm_needed(message: str, argument_bytes: int = 0) -> float | None:
  """Bytes per device a TPU compile's RESOURCE_EXHAUSTED message implies.

  Args:
    message: the error text.
    argument_bytes: the program's arguments on one device, added where the
      message counts only the temporaries.

  Returns:
    The bytes, or None when the message names no size.
  """
  match = _HBM_USED.search(message)
  if match:
    return float(match.group(1)) * _UNIT[match.group(2)]
  match = _HBM_TEMPORARIES.search(message)
  if match:
    return float(match.group(1)) * _UNIT[match.group(2)] + argument_bytes
  return None


def argument_bytes(tree: Any) -> int:
  """Bytes of one device's shards of abstract arrays with shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * leaf.dtype.itemsize
  return total


@dataclasses.dataclass
class Compiled:
  """One compile's outcome: the program, or why it does not fit."""

  seconds: float
  compiled: Any = None
  needed: float | None = None  # bytes, from a RESOURCE_EXHAUSTED message
  error: str | None = None

  @property
  def exhausted(self) -> bool:
    return self.compiled is None


def _compile(lowered, arguments: Any) -> Compiled:
  """``lowered.compile()``, or what a RESOURCE_EXHAUSTED error says."""
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    return Compiled(
      time.perf_counter() - start,
      needed=hbm_needed(str(e), argument_bytes(arguments)),
      error=first_line(e),
    )
  return Compiled(time.perf_counter() - start, compiled=compiled)


def compile_step(config, mesh, platform: str) -> Compiled:
  """The train step exactly as ``train.py`` builds it, for ``mesh``."""
  from dino_jax import checkpoint, parallel
  from dino_jax import step as step_lib

  built = step_lib.build_sharded_step(
    config, mesh, steps_per_epoch(config), backend=platform
  )
  state = checkpoint.abstract_like(built.state_shape, built.state_sharding)
  batch = checkpoint.abstract_like(
    built.batch_shape, parallel.tree_batch_sharding(mesh, built.batch_shape)
  )
  return _compile(built.jitted.lower(state, batch), (state, batch))


def compile_features(config, mesh, platform: str) -> Compiled:
  """The k-NN feature function at ``eval.batch_size``.

  ``features.jit_feature_fn`` (teacher backbone, CLS), the function the
  evaluations run, with the parameters sharded as the train state holds the
  teacher's.
  """
  import numpy as np

  from dino_jax import checkpoint, parallel
  from dino_jax import step as step_lib
  from dino_jax.evaluation import features

  _, teacher = step_lib.build_models(config, platform)
  backbone = teacher.backbone
  e = config.eval
  probe = np.zeros((1, e.crop_size, e.crop_size, 3), np.float32)

  def variables():  # a ResNet's with its running statistics (inference)
    out = backbone.init(jax.random.PRNGKey(0), probe)
    return out if 'batch_stats' in out else out['params']

  params_shape = jax.eval_shape(variables)
  params = checkpoint.abstract_like(
    params_shape,
    parallel.state_sharding(mesh, params_shape, config.mesh.fsdp_min_size),
  )
  images = jax.ShapeDtypeStruct(
    (e.batch_size, e.crop_size, e.crop_size, 3),
    np.float32,
    sharding=parallel.batch_sharding(mesh),
  )
  fn = features.jit_feature_fn(backbone, mesh, 'cls')
  return _compile(fn.lower(params, images), (params, images))


def fits(result: Compiled, limit: float) -> bool:
  """Whether a compile succeeded with a peak within ``limit`` bytes."""
  return not result.exhausted and memory(result.compiled)['peak'] <= limit
