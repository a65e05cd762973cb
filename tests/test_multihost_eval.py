"""Evaluation on 2 processes x 2 devices equals 1 process x 4 devices.

Two processes train the tiny config (fsdp-split parameters) and evaluate at
the end: k-NN (trained, random init, raw pixels) and attention maps; then
two processes of ``python -m dino_jax.eval.linear`` train the linear probe
of the saved teacher. One process with 4 devices evaluates the same
checkpoint: the same k-NN tables, the same PNGs and the same probe
accuracy. (The same training on one process would not give the same
weights: the input pipeline shards and shuffles the data per process.)
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import portpicker
import pytest
from test_cli import env as cli_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OVERRIDES = (
  '--config.epochs=1',
  '--config.checkpoint_every_steps=8',  # one save, the evaluated step
  '--config.mesh.fsdp=2',
  # Split the tiny model's larger tensors over fsdp (the default threshold
  # keeps every tensor of it whole).
  '--config.mesh.fsdp_min_size=1024',
  '--config.eval.baselines=true',
  '--config.eval.attention_images=3',  # padded to the 4 devices
  '--config.eval.ks=(3, 5, 10)',
  '--config.linear.augment=false',
  '--config.linear.epochs=3',
  '--config.linear.lr=2.0',
  '--config.linear.batch_size=16',
  '--config.linear.n_last_blocks=2',
)


def _start(mode, workdir, devices, num_processes, process_id, port, *args):
  return subprocess.Popen(
    [
      sys.executable,
      os.path.join(HERE, 'multihost_eval_worker.py'),
      mode,
      workdir,
      str(devices),
      str(num_processes),
      str(process_id),
      str(port),
      *args,
    ],
    env=cli_env(devices=devices),  # the worker sets its own count last
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _outputs(workdir):
  def read(name):
    with open(os.path.join(workdir, name)) as f:
      return f.read()

  pngs = sorted(os.listdir(os.path.join(workdir, 'eval', 'attention')))
  return {
    'knn': json.loads(read('eval/knn.json')),
    'linear': json.loads(read('eval/linear.json')),
    'pngs': {
      name: open(os.path.join(workdir, 'eval', 'attention', name), 'rb').read()
      for name in pngs
    },
  }


def _wait(procs):
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-4000:]


@pytest.mark.slow
def test_two_processes_evaluate_as_one(tmp_path):
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  port = portpicker.pick_unused_port()
  procs = [_start('train', multi, 2, 2, i, port, *OVERRIDES) for i in range(2)]
  _wait(procs)
  os.makedirs(single)
  shutil.copytree(
    os.path.join(multi, 'checkpoints'), os.path.join(single, 'checkpoints')
  )
  port = portpicker.pick_unused_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'dino_jax.eval.linear',
        f'--workdir={multi}',
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ],
      env=cli_env(devices=2),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  # Meanwhile (the checkpoint's config, no overrides):
  _wait([_start('eval', single, 4, 1, 0, 0), *procs])
  got, want = _outputs(multi), _outputs(single)
  assert got['knn']['step'] == 8  # 64 images / batch 8, one epoch
  # Every table: trained, random init, raw pixels, each k.
  assert set(want['knn']) == {'step', 'trained', 'random_init', 'raw_pixels'}
  assert got['knn'] == want['knn']
  # 3 images x (2 heads x (map, mask) + overview), byte for byte.
  assert len(want['pngs']) == 3 * 5
  assert got['pngs'].keys() == want['pngs'].keys()
  for name, data in want['pngs'].items():
    assert got['pngs'][name] == data, name
  assert got['linear']['feature_dim'] == want['linear']['feature_dim'] == 64
  np.testing.assert_allclose(
    got['linear']['best_top1'], want['linear']['best_top1'], atol=1e-6
  )
  np.testing.assert_allclose(
    [h['loss'] for h in got['linear']['history']],
    [h['loss'] for h in want['linear']['history']],
    rtol=1e-4,
  )
