"""launch/tpu_pod.sh and launch/slurm_gpu.sbatch run against stubs.

A stub ``gcloud`` runs ``compute tpus tpu-vm ssh --worker=all --command=C``
as one local process per worker (each in its own home folder, as on the
VMs), and a stub ``pip`` records the install. On a TPU VM JAX finds the
coordinator by itself; here a stub ``python`` passes it explicitly to
``dino_jax.main``. A stub ``srun`` starts the tasks with the SLURM variables
JAX reads. The scripts' quoting, the repository setup, the same command on
every worker, a preemption (SIGTERM to every worker) and the rerun that
resumes are exercised: the TPU script in tests/test_gcs.py (its pod
rehearsal on a gs:// workdir), the SLURM one here.
"""

import json
import os
import subprocess

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
