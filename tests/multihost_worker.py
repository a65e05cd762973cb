"""One process of a 2-process CPU run (tests/test_multihost.py).

  python tests/multihost_worker.py PROCESS_ID PORT OUT.json

Each process has 2 CPU devices (4 in all); the global batch is built the same
way in both and each process supplies its own shards. Process 0 writes the
losses of 3 train steps and a checksum of the final state.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = (  # the suite's flags, then 2 devices a process
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'
)
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
  jax.distributed.initialize(f'127.0.0.1:{port}', 2, process_id)
  from test_step import run_steps_global

  from dino_jax import parallel

  assert jax.process_count() == 2 and jax.device_count() == 4
  losses, checksum = run_steps_global(parallel.make_mesh(), 3)
  if process_id == 0:
    with open(out, 'w') as f:
      json.dump({'losses': losses, 'checksum': checksum}, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
