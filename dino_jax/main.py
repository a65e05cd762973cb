"""``python -m dino_jax.main --config=configs/vit_s16.py --workdir=DIR``.

The same command on a laptop CPU, one GPU, or every host of a TPU pod.
"""

import atexit
import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from dino_jax import cli_errors, console, hostmem

flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and evaluations.')
flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0 for multi-process runs without TPU/SLURM '
  'auto-detection (with --num_processes and --process_id).',
)
flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
flags.DEFINE_integer('process_id', None, 'This process.')
flags.DEFINE_string(
  'compilation_cache',
  '',
  "JAX's persistent compilation cache: a local or gs:// directory; default "
  'WORKDIR/compilation_cache (a restart loads the step instead of compiling '
  "it again); 'none' turns it off.",
)
config_flags.DEFINE_config_file(
  'config', None, 'Training config file.', lock_config=True
)
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with one clear line for a bad flag or config field.

  ``-h`` / ``--help``: the entry point's help (``console.TOOLS``), exit 0.
  """
  if console.wants_help(argv):
    name = console.program('__main__')
    if name not in console.TOOLS:  # imported (tests): this module's help
      name = __name__ if __name__ in console.TOOLS else 'dino_jax.main'
    console.print_help(console.tool_help(name, flags.FLAGS))
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - a config file raises its own
    print(f'error: {cli_errors.command_line_error(e, argv)}', file=sys.stderr)
  sys.exit(1)


def load_config():
  """The --config file's ConfigDict; one error line if it fails to load."""
  config = flags.FLAGS.config
  try:
    config.keys()  # a placeholder that raises if the file failed to load
    return config
  except OSError as e:  # ml_collections defers a failed load to here
    spec = flags.FLAGS['config'].serialize().split('=', 1)[-1]
    print(f'error: {cli_errors.config_file_error(spec, e)}', file=sys.stderr)
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = load_config()
  # The first line within seconds: JAX, the data and the first compile
  # take a minute on a CPU before the first step's line (process 0's).
  if not flags.FLAGS.process_id:
    print(
      f'dino_jax.main: {config.model.arch} on {config.data.source} in '
      f'{flags.FLAGS.workdir}; starting JAX, the data and the first '
      'compile (a minute on a CPU) before step 1',
      file=sys.stderr,
      flush=True,
    )
  from dino_jax import (  # after flags: keeps --help fast
    compilation_cache,
    parallel,
    train,
  )
  from dino_jax.checkpoint import (
    DamagedCheckpointError,
    IncompatibleCheckpointError,
  )
  from dino_jax.config import ConfigError
  from dino_jax.data.sources import DataError
  from dino_jax.metrics import NonFiniteLossError
  from dino_jax.storage import StorageError
  from dino_jax.workdir import WorkdirError

  # Libraries (orbax, grain) log every step of a save through absl at INFO;
  # keep those to warnings so the progress lines stay readable.
  logging.getLogger('absl').setLevel(logging.WARNING)
  console.quiet_other_processes(
    flags.FLAGS.process_id or 0, flags.FLAGS.num_processes or 1
  )
  parallel.initialize_distributed(
    flags.FLAGS.coordinator_address,
    flags.FLAGS.num_processes,
    flags.FLAGS.process_id,
  )
  console.quiet_other_processes(jax.process_index(), jax.process_count())
  logging.info(
    'process %d/%d, %d local devices: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.local_devices(),
  )
  compilation_cache.enable(
    compilation_cache.cache_path(
      flags.FLAGS.compilation_cache, flags.FLAGS.workdir
    )
  )
  result = None
  try:
    result = train.train_and_evaluate(config, flags.FLAGS.workdir)
  except (
    ConfigError,
    DataError,
    DamagedCheckpointError,
    IncompatibleCheckpointError,
    NonFiniteLossError,
    StorageError,
    WorkdirError,
  ) as e:
    print(f'error: {e}', file=sys.stderr)  # once: no absl E line as well
    sys.exit(1)
  except KeyboardInterrupt:  # a second Ctrl-C, or one before training
    pass  # below, once the traceback's frames are gone
  if result is None:
    print('interrupted', file=sys.stderr)
    # Exit without the interpreter's teardown, after the exit handlers
    # (multiprocessing's among them: its semaphores): a second Ctrl-C exits
    # without waiting for threads of Orbax (a save in flight) or XLA, and
    # such a thread crashed the teardown once (SIGSEGV, seen after a second
    # Ctrl-C during the first compile).
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
  if result.get('stopped_by') == 'SIGINT':
    sys.exit(130)  # the shell's convention for Ctrl-C (after the save)


if __name__ == '__main__':
  hostmem.configure()  # glibc malloc settings for XLA:CPU
  app.run(main, flags_parser=parse_flags)
