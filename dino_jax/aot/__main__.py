"""``python -m dino_jax.aot --config=configs/vit_s16.py --topology=v5e:4x8``.

Compiles the training program's step and the evaluation's feature function
for hardware this machine does not have, and says whether they fit and how
fast the step should run, before anyone rents a pod (MaxText
``train_compile.py`` does the same for its trainer). Everything runs on this
machine's CPU:

- TPU (``v4``, ``v5e``, ``v5p``, ``v6e``): libtpu describes the topology's
  chips (``jax.experimental.topologies.get_topology_desc``) and its compiler
  refuses a program that exceeds HBM (RESOURCE_EXHAUSTED), as on a real pod.
  Needs ``pip install -e '.[tpu]'``.
- NVIDIA GPU (``a100``, ``h100``, ``h200``): the CUDA PJRT plugin compiles for
  a ``GpuTargetConfigProto`` (``GPU_TARGETS``) without a GPU or a driver
  (jax ``tests/deviceless_aot_test.py``). XLA:GPU compiles a program of any
  size, so its peak is compared with the GPU's memory times the fraction
  JAX's allocator takes. Needs ``pip install -e '.[aot-gpu]'``.

The program is ``step.build_sharded_step`` (models, state sharding, on-device
multi-crop, the same jit as ``train.py``) with ``model.dtype`` and
``model.attention`` 'auto' resolved for the target, on the mesh
``parallel.make_mesh`` lays over the target's devices (slices stacked along
'data'). Exit status 1 when it does not fit or the target is unusable.
"""

import json
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from dino_jax.aot import AotError, format_report, parse_topology, run
from dino_jax.cli import flags as cli_flags

config_flags.DEFINE_config_file(
  'config', None, 'Training config file.', lock_config=True
)
flags.DEFINE_string(
  'topology',
  None,
  'TPU GEN:SHAPE (v5e:4x8, v4:2x2x2, v5p:2x2x1, v6e:2x4) or GPU GEN:COUNT '
  '(h100:8, h200:8, a100:8; HOSTSx8 for several hosts).',
)
flags.DEFINE_integer('slices', 1, 'TPU slices (multi-slice, over DCN).')
flags.DEFINE_float(
  'mfu', 0.35, 'Model FLOPs utilization assumed by the roofline estimate.'
)
flags.DEFINE_bool(
  'max_batch', False, 'Also find the largest global batch that fits.'
)
flags.DEFINE_integer(
  'max_batch_step',
  0,
  'Resolution of --max_batch in images (default: the device count; the '
  'batch is always a multiple of it).',
)
flags.DEFINE_bool(
  'eval_features', True, "Also compile the evaluation's feature function."
)
flags.DEFINE_string('out', None, 'Write the report as JSON to this path.')

flags.mark_flags_as_required(['config', 'topology'])


def parse_flags(argv: list[str]) -> list[str]:
  """The shell's parsing (``cli.flags``): one clear line for a bad flag or
  config field; ``-h`` / ``--help``: this tool's help, exit 0."""
  return cli_flags.parse_training_flags(argv, flags.FLAGS, 'dino_jax.aot')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from dino_jax.config import ConfigError

  config = cli_flags.loaded_config(flags.FLAGS)
  try:
    target = parse_topology(flags.FLAGS.topology, flags.FLAGS.slices)
    report = run(
      config,
      target,
      mfu=flags.FLAGS.mfu,
      eval_features=flags.FLAGS.eval_features,
      max_batch=flags.FLAGS.max_batch,
      max_batch_step=flags.FLAGS.max_batch_step,
    )
  except (AotError, ConfigError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(format_report(report), flush=True)
  if flags.FLAGS.out:
    with open(flags.FLAGS.out, 'w') as f:
      json.dump(report, f, indent=1)
  sys.exit(0 if report['fits'] else 1)


if __name__ == '__main__':
  # Compile-only: every target is described, none is run. Set before any
  # backend starts, so a GPU or TPU on this machine is left alone.
  jax.config.update('jax_platforms', 'cpu')
  app.run(main, flags_parser=parse_flags)
