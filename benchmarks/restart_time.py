"""Seconds from a ``python -m dino_jax.main`` start to its first step, for a
fresh run and its restart, with and without the compilation cache.

  python benchmarks/restart_time.py --config=tests/tiny_config.py \
      --workdir=/tmp/restart [--compilation_cache=none]

Runs the config for 2 steps (checkpoint at step 2), then again to step 4
in the same workdir (it resumes at step 3, as after a preemption), and
prints the time to each run's first step line and one JSON line.
``JAX_COMPILATION_CACHE_DIR`` is removed from the runs' environment, so the
cache is the workdir's (or none). ``--fake_gcs`` puts the workdir (and so
the cache) in a bucket of a local fake GCS server (tests/gcs_server.py, the
test extra's fake-gcs-server on 127.0.0.1): ``gs://restart/WORKDIR``.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def first_step_seconds(command: list[str], first_step: int, env: dict):
  """(seconds to the ``step N/`` line, seconds to the end, exit status)."""
  start = time.time()
  proc = subprocess.Popen(
    command,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env=env,
  )
  first, tail = None, []
  for line in proc.stdout:
    tail = (tail + [line])[-20:]
    if first is None and f'] step {first_step}/' in line:
      first = time.time() - start
  proc.wait()
  if first is None:
    sys.stderr.write(''.join(tail))
  return first, time.time() - start, proc.returncode


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='tests/tiny_config.py')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--compilation_cache', default='')
  parser.add_argument('--fake_gcs', action='store_true')
  args = parser.parse_args()
  env = {
    k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'
  }
  if args.fake_gcs:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
    import gcs_server

    log = os.path.join(tempfile.mkdtemp(prefix='restart_gcs_'), 'log')
    server = gcs_server.Server(log)
    env.update(server.env(), GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false')
    args.workdir = (
      server.create_bucket('restart') + '/' + args.workdir.strip('/')
    )
  else:
    shutil.rmtree(args.workdir, ignore_errors=True)
  try:
    run_twice(args, env)
  finally:
    if args.fake_gcs:
      server.stop()


def run_twice(args, env):
  out = {'compilation_cache': args.compilation_cache or 'workdir'}
  for run, steps in (('first', 2), ('restart', 4)):
    command = [
      sys.executable,
      '-m',
      'dino_jax.main',
      f'--config={args.config}',
      f'--workdir={args.workdir}',
      f'--config.total_steps={steps}',
      '--config.checkpoint_every_steps=2',
      '--config.eval.knn=False',
      f'--compilation_cache={args.compilation_cache}',
    ]
    first, total, rc = first_step_seconds(command, steps - 1, env)
    out[run] = {'first_step_seconds': first, 'seconds': total, 'rc': rc}
    print(f'{run}: first step after {first} s, done after {total:.0f} s')
  print(json.dumps(out))


if __name__ == '__main__':
  main()
