"""The training loop's overhead per step, against the bare jitted step.

A trivially cheap model on synthetic data, so that what is measured is the
loop (reading a batch, placing it on the devices, dispatching, logging,
signals), not the step. In one process:

  reference: the jitted train step called back to back on one batch that is
    already on the devices (nothing but dispatch and compute);
  loop: ``train.train_and_evaluate`` for the same config (data from the
    grain pipeline in this process, no evaluation), timed between its first
    and last log lines (``images_per_sec``).

Prints both times per step and their difference (the loop's overhead per
step), as a ratio too: machines are noisy, compare runs by the ratio.

  python benchmarks/loop_overhead.py [--steps 400] [--repeats 3]
"""

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dino_jax import config as config_lib  # noqa: E402
from dino_jax import parallel, train  # noqa: E402
from dino_jax import step as step_lib  # noqa: E402


def cheap_config(steps: int) -> config_lib.ml_collections.ConfigDict:
  c = config_lib.default_config()
  c.model.embed_dim = 16
  c.model.depth = 1
  c.model.num_heads = 1
  c.model.patch_size = 8
  c.model.img_size = 16
  c.model.out_dim = 16
  c.model.head_hidden_dim = 16
  c.model.head_bottleneck_dim = 8
  c.crops.global_size = 16
  c.crops.local_size = 8
  c.crops.local_number = 1
  c.data.source = 'synthetic'
  c.data.synthetic_size = 4096
  c.data.canvas_size = 16
  c.data.num_workers = 0
  c.batch_size = 8
  c.epochs = 1
  c.steps_per_epoch = steps
  c.optim.warmup_epochs = 0
  c.log_every_steps = steps // 4
  c.checkpoint_every_steps = 10 * steps  # only the last step is saved
  c.eval.knn = False
  c.eval.attention_images = 0
  return c


def reference_seconds_per_step(config, steps: int) -> float:
  """The bare step on one placed batch, back to back."""
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  built = step_lib.build_sharded_step(config, mesh, config.steps_per_epoch)
  state = jax.jit(built.init_fn, out_shardings=built.state_sharding)()
  rng = np.random.default_rng(0)
  c = config.data.canvas_size
  local = {
    'image': rng.integers(0, 255, (config.batch_size, c, c, 3), np.uint8),
    'size': np.full((config.batch_size, 2), c, np.int32),
    'label': np.zeros((config.batch_size,), np.int32),
  }
  batch = jax.device_put(local, parallel.batch_sharding(mesh))
  state, metrics = built.jitted(state, batch)  # compile
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = built.jitted(state, batch)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps


def loop_seconds_per_step(config, workdir: str) -> float:
  """Seconds per step of the training loop between its log lines."""
  train.train_and_evaluate(config, workdir)
  rows = [
    json.loads(line)
    for line in open(os.path.join(workdir, 'metrics.jsonl'))
    if '"images_per_sec"' in line
  ]
  # The first row includes the compile; the others time log_every steps.
  rates = [row['images_per_sec'] for row in rows[1:]]
  return config.batch_size / float(np.median(rates))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default='', help='append JSON rows here')
  args = parser.parse_args(argv)
  config = cheap_config(args.steps)
  for repeat in range(args.repeats):
    ref = reference_seconds_per_step(config, args.steps)
    with tempfile.TemporaryDirectory() as workdir:
      loop = loop_seconds_per_step(config, workdir)
    row = {
      'repeat': repeat,
      'devices': jax.device_count(),
      'reference_ms_per_step': 1e3 * ref,
      'loop_ms_per_step': 1e3 * loop,
      'overhead_ms_per_step': 1e3 * (loop - ref),
      'loop_over_reference': loop / ref,
    }
    print(json.dumps(row), flush=True)
    if args.out:
      with open(args.out, 'a') as f:
        f.write(json.dumps(row) + '\n')


if __name__ == '__main__':
  main()
