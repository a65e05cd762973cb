"""One process of a train-and-evaluate run (tests/test_multihost_eval.py).

  python tests/multihost_eval_worker.py MODE WORKDIR DEVICES NUM_PROCESSES \
      PROCESS_ID PORT [--config.a.b=c ...]

MODE 'train': trains the tiny config (tests/tiny_config.py, overridden by
the arguments) on DEVICES fake CPU devices per process, with the
end-of-training evaluations (k-NN, attention maps). MODE 'eval': the same
evaluations of WORKDIR's newest checkpoint, as the run would do them at its
end (the arguments override its saved config's eval, linear, data and mesh
fields), then the linear probe of the saved teacher (as ``python -m
dino_jax.eval.linear`` does). With NUM_PROCESSES > 1 the processes join
through jax.distributed at 127.0.0.1:PORT, and the mesh takes the devices
rotated by one, [1, 2, 3, 0]: each process's rows of a batch are not one
block (a TPU pod does not promise ``jax.devices()`` grouped by process), so
a label gathered in process order would miss its image. (Reversed, the
process halves would swap: with labels index % 10 and images split
index::2, a mis-pairing would only swap classes 0-1, 2-3, ..., which no
k-NN accuracy sees.)
"""

import os
import sys

DEVICES = int(sys.argv[3])
os.environ['XLA_FLAGS'] = (  # the suite's flags, then this run's devices
  os.environ.get('XLA_FLAGS', '')
  + f' --xla_force_host_platform_device_count={DEVICES}'
)
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def main():
  mode, workdir = sys.argv[1:3]
  num_processes, process_id, port = map(int, sys.argv[4:7])
  overrides = sys.argv[7:]
  if num_processes > 1:
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes, process_id)
  import tiny_config

  from dino_jax import overrides as overrides_lib
  from dino_jax import parallel, train
  from dino_jax import workdir as workdir_lib
  from dino_jax.evaluation import linear, run

  assert jax.device_count() == DEVICES * num_processes
  if num_processes > 1:
    make_mesh = parallel.make_mesh
    devices = jax.devices()[1:] + jax.devices()[:1]
    parallel.make_mesh = lambda data=-1, fsdp=1: make_mesh(
      data, fsdp, devices=devices
    )
    order = [d.process_index for d in parallel.make_mesh(-1, 2).devices.flat]
    assert order == [0, 1, 1, 0], order
  if mode == 'train':
    config = overrides_lib.apply_overrides(tiny_config.get_config(), overrides)
    train.train_and_evaluate(config, workdir)
  else:
    config, mesh, state, step = workdir_lib.load_workdir(workdir, overrides)
    run.after_training(config, workdir, mesh, state, step, final=True)
    linear.linear_from_workdir(workdir, overrides)
  if num_processes > 1:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main()
