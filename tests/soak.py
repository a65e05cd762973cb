"""Soak test of the training CLI as operators run it: interrupted many ways.

  python tests/soak.py --cycles 40 --seed 0 --base /tmp/soak

First trains a tiny run (tests/tiny_config.py, 24 steps, a checkpoint every
3, a k-NN evaluation every 6, 0.02 s of storage delay per image) without
interruption: the reference. Then, cycle after cycle, starts the same
command on one workdir (0, 1 or 2 data workers, in its own process group,
SIGINT not ignored, as from a terminal) and, at a random time, sends the
group SIGTERM, SIGINT, SIGKILL or two SIGINTs or SIGTERMs; sometimes starts a
second run on the same workdir meanwhile (it must be refused), and
sometimes truncates a file of the newest checkpoint afterwards. After each
cycle it checks: the run exited with the code the signal calls for, no
traceback, no process of the group left, no shared memory left in
/dev/shm. Each time a run completes, its metrics.jsonl must hold every
step's loss once and every evaluation once, equal to the reference's (CPU:
bit-identical), and the next cycle starts a new workdir. Prints OK or the
problems; exit status 1 on problems. Not part of the pytest suite (about
40 s a cycle on 2 cores). /dev/shm is the machine's: run it where no other
job uses shared memory, or in a private one:

  unshare -m sh -c 'mount -t tmpfs tmpfs /dev/shm && python tests/soak.py'

"""

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = (
  '--config.total_steps=24',
  '--config.epochs=3',
  '--config.checkpoint_every_steps=3',
  '--config.eval_every_steps=6',
  '--config.eval.attention_images=1',
  '--config.data.synthetic_delay=0.02',
)
SIGNALS = {
  'TERM': (signal.SIGTERM, 1),
  'INT': (signal.SIGINT, 1),
  'KILL': (signal.SIGKILL, 1),
  'INT2': (signal.SIGINT, 2),
  'TERM2': (signal.SIGTERM, 2),
}
# Exit codes a signal may give: the run's own (0 after SIGTERM, 130 after
# Ctrl-C), or death by the signal before the run installs its handlers
# (during imports) or after it finished.
EXPECTED_RC = {
  'TERM': (0, -15),
  'TERM2': (0, -15),
  'INT': (130, -2),
  'INT2': (130, -2),
  'KILL': (-9,),
  'none': (0,),
}


def environment():
  e = dict(os.environ)
  e['JAX_PLATFORMS'] = 'cpu'
  e['JAX_DISABLE_MOST_OPTIMIZATIONS'] = 'true'
  e['PYTHONPATH'] = ROOT + os.pathsep + e.get('PYTHONPATH', '')
  return e


def command(workdir, workers):
  return [
    sys.executable,
    '-m',
    'dino_jax.main',
    f'--config={ROOT}/tests/tiny_config.py',
    f'--workdir={workdir}',
    *ARGS,
    f'--config.data.num_workers={workers}',
  ]


def start(workdir, workers, log):
  return subprocess.Popen(
    command(workdir, workers),
    env=environment(),
    cwd=ROOT,
    stdout=log,
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )


def group_alive(pgid):
  for entry in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{entry}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue
    if int(fields[2]) == pgid and fields[0] != 'Z':
      return True
  return False


def shared_memory():
  return {n for n in os.listdir('/dev/shm') if n.startswith(('psm_', 'sem.'))}


def summary(workdir):
  """(step, loss) of each training row; (step, k-NN columns) of the rest."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  train = [(r['step'], r['loss']) for r in rows if 'loss' in r]
  evals = [
    (r['step'], {k: v for k, v in r.items() if k.startswith('knn_')})
    for r in rows
    if 'loss' not in r
  ]
  return train, evals


def _log_times(text, marker):
  """The absl timestamps (s of the day) of the log lines holding marker."""
  times = []
  for line in text.splitlines():
    if marker in line and line[:1] in 'IWE' and line[5:6] == ' ':
      h, m, sec = line.split()[1].split(':')
      times.append(int(h) * 3600 + int(m) * 60 + float(sec))
  return times


def ran_beside(first_log, second_stderr):
  """Whether the second run trained while the first still ran: its mesh
  line (logged after it took the workdir's lock) came before the first
  run's last line. (A second run started as the first ends can take the
  lock after the first let it go: it then rightly runs.)"""
  taken = _log_times(second_stderr, '] mesh ')
  ended = _log_times(first_log, '] ')
  return bool(taken) and (not ended or taken[0] < ended[-1])


def wait_until(condition, seconds):
  deadline = time.time() + seconds
  while not condition() and time.time() < deadline:
    time.sleep(0.1)
  return condition()


def damage_newest_checkpoint(workdir, rng):
  """Truncates one file of the newest of at least two checkpoints."""
  root = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    return None
  steps = sorted(int(d) for d in os.listdir(root) if d.isdigit())
  if len(steps) < 2:
    return None
  files = [
    f
    for f in glob.glob(f'{root}/{steps[-1]}/state/**/*', recursive=True)
    if os.path.isfile(f) and os.path.getsize(f) > 64
  ]
  if not files:
    return None
  victim = rng.choice(files)
  with open(victim, 'r+b') as f:
    f.truncate(os.path.getsize(victim) // 2)
  return victim


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cycles', type=int, default=40)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--base', default='/tmp/dino_jax_soak')
  args = parser.parse_args()
  signal.signal(signal.SIGINT, signal.SIG_DFL)  # as from a terminal
  rng = random.Random(args.seed)
  shutil.rmtree(args.base, ignore_errors=True)
  os.makedirs(args.base)
  reference = os.path.join(args.base, 'reference')
  with open(f'{reference}.log', 'w') as log:
    began = time.time()
    proc = start(reference, 2, log)
    proc.wait()
    duration = time.time() - began
  if proc.returncode != 0:
    sys.exit(f'the reference run failed: see {reference}.log')
  expected = summary(reference)
  print(f'reference: {duration:.0f} s, evaluations {expected[1]}', flush=True)
  problems, completed, generation = [], 0, 0
  workdir = os.path.join(args.base, 'work0')

  def check_completed(workdir):
    got = summary(workdir)
    for name, a, b in zip(
      ('losses', 'evaluations'), got, expected, strict=True
    ):
      if a != b:
        problems.append(f'{workdir}: {name} {a} differ from {b}')

  before = shared_memory()
  for cycle in range(args.cycles):
    workers = rng.choice([0, 1, 2])
    how = rng.choice(sorted(SIGNALS))
    delay = rng.uniform(0, duration * 1.1)
    log_path = os.path.join(args.base, f'cycle{cycle:02d}.log')
    second = None
    with open(log_path, 'w') as log:
      proc = start(workdir, workers, log)
      time.sleep(delay)
      log.flush()
      with open(log_path) as f:
        training = ' step ' in f.read()  # the run holds the workdir's lock
      if training and rng.random() < 0.15:  # another run on it meanwhile
        second = subprocess.run(
          command(workdir, 0),
          env=environment(),
          cwd=ROOT,
          capture_output=True,
          text=True,
        )
      if proc.poll() is None:
        signum, times = SIGNALS[how]
        for i in range(times):
          if i:
            time.sleep(rng.uniform(0, 0.5))
          try:
            os.killpg(proc.pid, signum)
          except ProcessLookupError:
            pass
      else:
        how = 'none'
      try:
        proc.wait(timeout=300)
      except subprocess.TimeoutExpired:
        problems.append(f'cycle {cycle}: hung after {how}')
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if not wait_until(lambda pgid=proc.pid: not group_alive(pgid), 15):
      problems.append(f'cycle {cycle}: processes left after {how}')
    if not wait_until(lambda seen=before: not shared_memory() - seen, 25):
      problems.append(f'cycle {cycle}: left {shared_memory() - before}')
      before = shared_memory()
    with open(log_path) as f:
      text = f.read()
    started = 'main.py' in text  # else the signal came during the imports
    if started and proc.returncode not in EXPECTED_RC[how]:
      problems.append(f'cycle {cycle}: exit {proc.returncode} after {how}')
    # A Ctrl-C during the imports, before the CLI starts, is Python's
    # KeyboardInterrupt traceback; any other traceback is a problem.
    if 'Traceback' in text and not (
      text.rstrip().endswith('KeyboardInterrupt') and not started
    ):
      problems.append(f'cycle {cycle}: a traceback in {log_path}')
    for bad in ('Fatal Python error', 'leaked'):
      if bad in text:
        problems.append(f'cycle {cycle}: {bad!r} in {log_path}')
    if (
      second is not None
      and second.returncode == 0
      and ran_beside(text, second.stderr)
    ):
      problems.append(f'cycle {cycle}: a second run on the workdir ran')
    finished = 'attention maps:' in text
    damaged = None
    if not finished and rng.random() < 0.2:
      damaged = damage_newest_checkpoint(workdir, rng)
    print(
      f'cycle {cycle}: {workers} workers, {how} at {delay:.1f} s, exit '
      f'{proc.returncode}'
      + (', completed' if finished else '')
      + (f', damaged {damaged}' if damaged else ''),
      flush=True,
    )
    if finished:
      check_completed(workdir)
      completed += 1
      generation += 1
      workdir = os.path.join(args.base, f'work{generation}')
  with open(os.path.join(args.base, 'last.log'), 'w') as log:
    proc = start(workdir, 2, log)
    proc.wait()
  if proc.returncode != 0:
    problems.append(f'the last run exited {proc.returncode}')
  check_completed(workdir)
  print(f'{completed + 1} runs completed and compared with the reference')
  print('PROBLEMS' if problems else 'OK', *problems, sep='\n')
  sys.exit(1 if problems else 0)


if __name__ == '__main__':
  main()
