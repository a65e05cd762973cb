"""One process of the downstream protocols (tests/test_multihost_downstream).

  python tests/multihost_downstream_worker.py WORKDIR DEVICES NUM_PROCESSES \
      PROCESS_ID PORT [--config.a.b=c ...]

Evaluates WORKDIR's newest checkpoint as a run does at its end
(``evaluation.run.after_training``; the arguments override the saved config's
eval fields, e.g. ``eval.retrieval_root``) on DEVICES fake CPU devices per
process. With NUM_PROCESSES > 1 the processes join through
jax.distributed at 127.0.0.1:PORT and the mesh takes the devices rotated
by one (as tests/multihost_eval_worker.py: each process's rows of a batch
are not one block). Prints one line ``images read: {...}``: how many
images this process decoded, per protocol.
"""

import collections
import json
import os
import sys

DEVICES = int(sys.argv[2])
os.environ['XLA_FLAGS'] = (  # the suite's flags, then this run's devices
  os.environ.get('XLA_FLAGS', '')
  + f' --xla_force_host_platform_device_count={DEVICES}'
)
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def count_reads(module, name: str, counts: collections.Counter) -> None:
  """Counts the calls of ``module.<name>`` under the module's name."""
  original = getattr(module, name)

  def counted(*args, **kwargs):
    counts[module.__name__.rsplit('.', 1)[1]] += 1
    return original(*args, **kwargs)

  setattr(module, name, counted)


def main():
  workdir = sys.argv[1]
  num_processes, process_id, port = map(int, sys.argv[3:6])
  overrides = sys.argv[6:]
  if num_processes > 1:
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes, process_id)

  from dino_jax import parallel
  from dino_jax import workdir as workdir_lib
  from dino_jax.evaluation import copy_detection, retrieval, run, video

  assert jax.device_count() == DEVICES * num_processes
  if num_processes > 1:
    make_mesh = parallel.make_mesh
    devices = jax.devices()[1:] + jax.devices()[:1]
    parallel.make_mesh = lambda data=-1, fsdp=1: make_mesh(
      data, fsdp, devices=devices
    )
  counts = collections.Counter()
  count_reads(retrieval, 'load_image', counts)
  count_reads(copy_detection, 'load_image', counts)
  count_reads(video, 'read_frame', counts)
  config, mesh, state, step = workdir_lib.load_workdir(workdir, overrides)
  run.after_training(config, workdir, mesh, state, step, final=True)
  print('images read:', json.dumps(dict(counts)), flush=True)
  if num_processes > 1:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main()
