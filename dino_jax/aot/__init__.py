"""Ahead-of-time compiles for hardware this machine lacks (a tool).

``python -m dino_jax.aot --config=FILE --topology=TARGET`` (``__main__``)
compiles the train step and the evaluation's feature function for a TPU
topology or a GPU node on this machine's CPU and says whether they fit and
how fast the step should run (docs/aot.md). One module per idea:

- ``targets``: the chip catalogue, ``--topology`` parsing, the target's
  compile-only devices (libtpu, the CUDA plugin);
- ``compile``: the step and the feature function compiled on a target's
  mesh, their memory, a RESOURCE_EXHAUSTED message's bytes;
- ``hlo``: reading a compiled program (collectives, instructions, XLA's
  FLOPs and bytes);
- ``search``: the largest global batch that fits;
- ``report``: the report as JSON and as the printed lines, the roofline.

The library never imports this package.
"""

from dino_jax.aot.compile import (
  Compiled,
  compile_features,
  compile_step,
  hbm_needed,
  memory,
  steps_per_epoch,
)
from dino_jax.aot.hlo import collectives, hlo_instructions, xla_cost, xla_flops
from dino_jax.aot.report import format_report, roofline, run, verdict
from dino_jax.aot.search import find_max_batch
from dino_jax.aot.targets import (
  CHIPS,
  GPU_TARGETS,
  AotError,
  Chip,
  GiB,
  Target,
  check_config,
  gpu_target_config,
  parse_topology,
  target_devices,
)

__all__ = [
  'AotError',
  'CHIPS',
  'Chip',
  'Compiled',
  'GPU_TARGETS',
  'GiB',
  'Target',
  'check_config',
  'collectives',
  'compile_features',
  'compile_step',
  'find_max_batch',
  'format_report',
  'gpu_target_config',
  'hbm_needed',
  'hlo_instructions',
  'memory',
  'parse_topology',
  'roofline',
  'run',
  'steps_per_epoch',
  'target_devices',
  'verdict',
  'xla_cost',
  'xla_flops',
]
