"""Two local processes of ``python -m dino_jax.main`` agree on preemption."""

import json
import os
import signal
import subprocess
import sys
import time

import portpicker
import pytest
from test_cli import env as cli_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _main_processes(workdir, port, *overrides):
  env = cli_env(devices=1)  # one CPU device per process
  env['DINO_JAX_LOG_ALL_PROCESSES'] = '1'  # process 1's lines checked too
  return [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'dino_jax.main',
        f'--config={os.path.join(HERE, "tiny_config.py")}',
        f'--workdir={workdir}',
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
        '--config.eval.knn=False',
        '--config.eval.attention_images=0',
        *overrides,
      ],
      env=env,
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]


@pytest.mark.slow
def test_sigterm_a_step_apart_saves_one_consistent_checkpoint(tmp_path):
  # The notice reaches the two processes ~2 s apart (several steps): both
  # must save the same step (the save is collective), exit 0, and resume.
  workdir = str(tmp_path / 'work')
  procs = _main_processes(
    workdir,
    portpicker.pick_unused_port(),
    '--config.epochs=100',
    '--config.total_steps=1000',
    '--config.checkpoint_every_steps=1000',
  )
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 400
  while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
    assert time.time() < deadline, 'no progress'
    assert all(p.poll() is None for p in procs), procs[0].stderr.read()
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  time.sleep(2.0)
  procs[0].send_signal(signal.SIGTERM)
  logs = [p.communicate(timeout=300)[1] for p in procs]
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-3000:]
    assert 'Traceback' not in log
  saved = sorted(
    int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))
  )
  assert len(saved) == 1, saved
  for log in logs:
    assert f'saved step {saved[0]} in' in log
  procs = _main_processes(
    workdir,
    portpicker.pick_unused_port(),
    '--config.epochs=100',
    f'--config.total_steps={saved[0] + 2}',
    '--config.checkpoint_every_steps=1000',
  )
  logs = [p.communicate(timeout=400)[1] for p in procs]
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-3000:]
    assert f'resuming from step {saved[0]}' in log
  with open(metrics) as f:
    steps = [json.loads(line)['step'] for line in f if line.strip()]
  assert steps == list(range(1, saved[0] + 3))
