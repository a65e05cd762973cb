"""Preempt a multi-process run and resume it with another process count.

A rehearsal of a pod whose job is preempted and comes back on another
shape, on this machine (fake CPU devices, real processes through
``jax.distributed`` on 127.0.0.1):

  1. reference: the tiny config, 1 process x 8 devices, to the end;
  2. the same command in 4 processes x 2 devices; SIGTERM to every process
     once a few steps are logged: all save the same step and exit 0;
  3. the same command in 2 processes x 4 devices: resumes from that step,
     trains to the end, evaluates (k-NN with the teacher, attention maps);
  4. checks: every step's row once in metrics.jsonl, losses equal to the
     reference within float tolerance, the k-NN table too.

  python tests/process_count_resume.py [--steps 12] [--workdir DIR]

Takes about 3 minutes on 2 cores (every process compiles the step). Exit 0
when every check passes; prints the loss rows side by side.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import portpicker  # noqa: E402
from test_cli import command  # noqa: E402
from test_cli import env as cli_env  # noqa: E402


def overrides(steps: int) -> list[str]:
  return [
    '--config.epochs=100',  # schedules independent of --steps
    f'--config.total_steps={steps}',
    '--config.checkpoint_every_steps=1000',
    '--config.log_every_steps=1',
    '--config.eval.knn=True',
    '--config.eval.attention_images=1',
  ]


def start(workdir, steps, processes, devices) -> list[subprocess.Popen]:
  flags = overrides(steps)
  if processes > 1:
    port = portpicker.pick_unused_port()
    flags += [
      f'--coordinator_address=127.0.0.1:{port}',
      f'--num_processes={processes}',
    ]
  procs = []
  for i in range(processes):
    extra = [f'--process_id={i}'] if processes > 1 else []
    log = open(
      os.path.join(workdir + '.logs', f'{processes}x{devices}.{i}'), 'w'
    )
    procs.append(
      subprocess.Popen(
        command(workdir, *flags, *extra),
        env=cli_env(devices=devices),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
      )
    )
  return procs


def wait_all(procs, timeout=900) -> list[int]:
  return [p.wait(timeout=timeout) for p in procs]


def rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def losses(workdir) -> dict[int, float]:
  return {r['step']: r['loss'] for r in rows(workdir) if 'loss' in r}


def knn(workdir) -> dict[str, float]:
  return {
    k: v for r in rows(workdir) for k, v in r.items() if k.startswith('knn_')
  }


def log_tail(workdir, name) -> str:
  with open(os.path.join(workdir + '.logs', name)) as f:
    return f.read()[-3000:]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=12)
  parser.add_argument('--workdir', default='')
  parser.add_argument('--rtol', type=float, default=1e-4)
  args = parser.parse_args(argv)
  base = args.workdir or tempfile.mkdtemp(prefix='process_count_resume_')
  ref_dir, run_dir = os.path.join(base, 'ref'), os.path.join(base, 'run')
  for d in (ref_dir, run_dir):
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d + '.logs', exist_ok=True)
  problems = []
  t0 = time.time()

  print('reference: 1 process x 8 devices ...', flush=True)
  if wait_all(start(ref_dir, args.steps, 1, 8)) != [0]:
    print(log_tail(ref_dir, '1x8.0'))
    return 1
  print(f'  done in {time.time() - t0:.0f} s', flush=True)

  t1 = time.time()
  print('run: 4 processes x 2 devices, SIGTERM to all ...', flush=True)
  procs = start(run_dir, args.steps, 4, 2)
  metrics = os.path.join(run_dir, 'metrics.jsonl')
  deadline = time.time() + 900
  while not (os.path.exists(metrics) and len(rows(run_dir)) >= 3):
    if time.time() > deadline or any(p.poll() is not None for p in procs):
      print(log_tail(run_dir, '4x2.0'))
      return 1
    time.sleep(0.05)
  for p in procs:
    os.killpg(p.pid, signal.SIGTERM)
  codes = wait_all(procs)
  saved = sorted(
    int(d) for d in os.listdir(os.path.join(run_dir, 'checkpoints'))
  )
  print(f'  exit codes {codes}, saved steps {saved} ({time.time() - t1:.0f} s)')
  if codes != [0] * 4:
    problems.append(f'4x2 exit codes {codes}')
  for i in range(4):
    if f'saved step {saved[-1]} in' not in log_tail(run_dir, f'4x2.{i}'):
      problems.append(f'4x2 process {i} did not report saving {saved[-1]}')
  if saved[-1] >= args.steps:
    problems.append(f'stopped too late to test a resume (step {saved[-1]})')

  t2 = time.time()
  print('resume: 2 processes x 4 devices ...', flush=True)
  codes = wait_all(start(run_dir, args.steps, 2, 4))
  print(f'  exit codes {codes} ({time.time() - t2:.0f} s)')
  if codes != [0, 0]:
    problems.append(f'2x4 exit codes {codes}')
    print(log_tail(run_dir, '2x4.0'))
  for i in range(2):
    if f'resuming from step {saved[-1]}' not in log_tail(run_dir, f'2x4.{i}'):
      problems.append(f'2x4 process {i} did not resume from {saved[-1]}')

  steps = [r['step'] for r in rows(run_dir) if 'loss' in r]
  if steps != list(range(1, args.steps + 1)):
    problems.append(f'loss rows of steps {steps}, not each step once')
  ref, got = losses(ref_dir), losses(run_dir)
  print('step  1x8 loss      4x2 -> 2x4 loss  rel. diff')
  for step in sorted(ref):
    diff = abs(got.get(step, float('nan')) - ref[step]) / abs(ref[step])
    mark = ' (resumed)' if step == saved[-1] + 1 else ''
    print(
      f'{step:4d}  {ref[step]:.8f}  {got.get(step, float("nan")):.8f}'
      f'      {diff:.1e}{mark}'
    )
    if not diff <= args.rtol:
      problems.append(f'step {step}: loss {got.get(step)} vs {ref[step]}')
  ref_knn, got_knn = knn(ref_dir), knn(run_dir)
  print('k-NN 1x8:', ref_knn)
  print('k-NN 2x4:', got_knn)
  if ref_knn != got_knn:
    problems.append('k-NN differs')
  attention = os.path.join(run_dir, 'eval', 'attention')
  if not (os.path.isdir(attention) and os.listdir(attention)):
    problems.append('no attention maps written')
  print(f'total {time.time() - t0:.0f} s')
  for p in problems:
    print('PROBLEM:', p)
  print('OK' if not problems else f'{len(problems)} problems')
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main())
