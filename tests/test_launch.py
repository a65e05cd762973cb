"""launch/tpu_pod.sh and launch/slurm_gpu.sbatch run against stubs.

A stub ``gcloud`` runs ``compute tpus tpu-vm ssh --worker=all --command=C``
as one local process per worker (each in its own home folder, as on the
VMs), and a stub ``pip`` records the install. On a TPU VM JAX finds the
coordinator by itself; here a stub ``python`` passes it explicitly to
``dino_jax.main``. A stub ``srun`` starts the tasks with the SLURM variables
JAX reads. The scripts' quoting, the repository setup, the same command on
every worker, a preemption (SIGTERM to every worker) and the rerun that
resumes are exercised.
"""

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
TINY = os.path.join(HERE, 'tiny_config.py')

_GCLOUD = r"""#!/usr/bin/env bash
# Stub gcloud: tpu-vm create is recorded; tpu-vm ssh --worker=all runs the
# command once per worker, each in its own home folder.
set -u
printf '%s\n' "gcloud $*" >> "$STUB_LOG"
if [[ "$1 $2 $3 $4" == 'compute tpus tpu-vm create' ]]; then exit 0; fi
if [[ "$1 $2 $3 $4" != 'compute tpus tpu-vm ssh' ]]; then exit 2; fi
command=
for arg in "$@"; do
  case "$arg" in
    --command=*) command=${arg#--command=} ;;
    --worker=*) [[ "${arg#--worker=}" == all ]] || exit 2 ;;
  esac
done
pids=()
for ((i = 0; i < STUB_WORKERS; i++)); do
  mkdir -p "$STUB_HOMES/worker$i"
  (cd "$STUB_HOMES/worker$i" && STUB_PROCESS_ID=$i exec bash -c "$command") &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
"""

_PYTHON = r"""#!/usr/bin/env bash
# Stub python of a worker: dino_jax.main gets the coordinator explicitly
# (what JAX reads from a TPU VM's metadata) and leaves its pid.
if [[ "${1:-} ${2:-}" == '-m dino_jax.main' ]]; then
  echo $$ > "$STUB_HOMES/worker$STUB_PROCESS_ID.pid"
  printf '%s\n' "worker $STUB_PROCESS_ID: $*" >> "$STUB_LOG"
  exec "$STUB_PYTHON" "$@" --coordinator_address="127.0.0.1:$STUB_PORT" \
    --num_processes="$STUB_WORKERS" --process_id="$STUB_PROCESS_ID"
fi
exec "$STUB_PYTHON" "$@"
"""

_PIP = r"""#!/usr/bin/env bash
printf '%s\n' "pip $* (in ${PWD##*/})" >> "$STUB_LOG"
"""

_SRUN = r"""#!/usr/bin/env bash
# Stub srun: the tasks of one node, with the variables JAX's SLURM
# detection reads; --options before the command are skipped.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
  echo $! > "$STUB_HOMES/task$i.pid"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
"""


def quick_env(devices: int = 1) -> dict[str, str]:
  """test_cli's environment for CLI subprocesses.

  (Not JAX's jax_share_binary_between_hosts, one compile per multi-process
  run: on CPU, process 1 waited for ever for the program of orbax's first
  sync.) Every process prints its INFO lines (prefixed): the tests check
  what each one did.
  """
  return {**cli_env(devices=devices), 'DINO_JAX_LOG_ALL_PROCESSES': '1'}


def _stubs(tmp_path, **scripts) -> str:
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  for name, text in scripts.items():
    path = bin_dir / name
    path.write_text(text)
    path.chmod(0o755)
  return str(bin_dir)


def _metrics(path) -> list[int]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line)['step'] for line in f if line.strip()]


def _preempt(pid_files, metrics, procs):
  """SIGTERM to every worker once 2 steps are logged."""
  deadline = time.time() + 400
  while len(_metrics(metrics)) < 2 or not all(
    os.path.exists(p) for p in pid_files
  ):
    assert time.time() < deadline, 'no progress'
    assert procs.poll() is None, procs.communicate()[1][-3000:]
    time.sleep(0.1)
  for path in pid_files:
    with open(path) as f:
      os.kill(int(f.read()), signal.SIGTERM)


class TestTPUPod:
  """Each script its own class: pytest-xdist's --dist loadscope may run
  them on both workers at once."""

  @pytest.mark.slow
  def test_tpu_pod_script_with_stub_gcloud(self, tmp_path):
    workdir = str(tmp_path / 'work dir')  # a space: the quoting is exercised
    homes = tmp_path / 'homes'
    homes.mkdir()
    environ = {
      **quick_env(),
      'PATH': _stubs(tmp_path, gcloud=_GCLOUD, python=_PYTHON, pip=_PIP)
      + os.pathsep
      + os.environ['PATH'],
      'STUB_LOG': str(tmp_path / 'stub.log'),
      'STUB_HOMES': str(homes),
      'STUB_WORKERS': '2',
      'STUB_PYTHON': sys.executable,
      'TPU_NAME': 'dino-test',
      'ZONE': 'us-test1-a',
      'WORKDIR': workdir,
      'REPO': ROOT,
    }
    flags = [
      f'--config={TINY}',
      '--config.eval.ks=(2, 4)',  # a space inside one argument
      '--config.eval.knn=False',
      '--config.eval.attention_images=0',
      '--config.checkpoint_every_steps=1000',
    ]
    script = os.path.join(ROOT, 'launch', 'tpu_pod.sh')
    environ['STUB_PORT'] = str(portpicker.pick_unused_port())
    proc = subprocess.Popen(
      ['bash', script, *flags, '--config.total_steps=1000'],
      env=environ,
      cwd=tmp_path,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    pid_files = [str(homes / f'worker{i}.pid') for i in range(2)]
    _preempt(pid_files, os.path.join(workdir, 'metrics.jsonl'), proc)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    saved = sorted(
      int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))
    )
    assert len(saved) == 1 and err.count(f'saved step {saved[0]} in') == 2, err
    for path in pid_files:
      os.remove(path)
    # The same script with CREATE=0 resumes on the same (stub) VMs.
    environ['CREATE'] = '0'
    environ['STUB_PORT'] = str(portpicker.pick_unused_port())
    result = subprocess.run(
      ['bash', script, *flags, f'--config.total_steps={saved[0] + 1}'],
      env=environ,
      cwd=tmp_path,
      capture_output=True,
      text=True,
      timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(f'resuming from step {saved[0]}') == 2
    assert _metrics(os.path.join(workdir, 'metrics.jsonl')) == list(
      range(1, saved[0] + 2)
    )
    with open(tmp_path / 'stub.log') as f:
      log = f.read().splitlines()
    creates = [line for line in log if 'tpu-vm create' in line]
    assert creates == [
      'gcloud compute tpus tpu-vm create dino-test --zone=us-test1-a '
      '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base'
    ]
    installs = sorted(line for line in log if line.startswith('pip '))
    # Two workers, two runs.
    assert installs == ['pip install -q -e .[gcs,tpu] (in dino_jax)'] * 4
    assert all(
      (homes / f'worker{i}' / 'dino_jax' / '.git').is_dir() for i in (0, 1)
    )
    commands = [
      line.split(': ', 1)[1] for line in log if line.startswith('worker')
    ]
    assert len(commands) == 4
    expected = (
      f'-m dino_jax.main --workdir={workdir} {" ".join(flags)} '
      '--config.total_steps='
    )
    assert all(c.startswith(expected) for c in commands), commands


class TestSlurm:
  @pytest.mark.slow
  def test_slurm_script_with_stub_srun(self, tmp_path):
    workdir = str(tmp_path / 'work')
    homes = tmp_path / 'homes'
    homes.mkdir()
    # JAX's coordinator port is SLURM_JOB_ID % 4096 + 61440.
    port = next(
      p
      for p in range(61440 + os.getpid() % 2048, 65536)
      if portpicker.is_port_free(p)
    )
    environ = {
      **quick_env(),
      'PATH': _stubs(tmp_path, srun=_SRUN) + os.pathsep + os.environ['PATH'],
      'STUB_HOMES': str(homes),
      'SLURM_JOB_ID': str(4096 * 100 + port - 61440),
      'SLURM_NTASKS': '2',
      'SLURM_STEP_NODELIST': '127.0.0.1',
      'SLURM_STEP_NUM_NODES': '1',
    }
    flags = [
      f'--config={TINY}',
      f'--workdir={workdir}',
      '--config.eval.knn=False',
      '--config.eval.attention_images=0',
    ]
    script = os.path.join(ROOT, 'launch', 'slurm_gpu.sbatch')
    # One short run: preemption and resume are the same code as on the TPU
    # script (and tests/test_multihost_preemption.py).
    result = subprocess.run(
      ['bash', script, *flags, '--config.total_steps=2'],
      env=environ,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for i in range(2):
      assert f'process {i}/2, 1 local devices' in result.stderr
    assert _metrics(os.path.join(workdir, 'metrics.jsonl')) == [1, 2]
    assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['2']
