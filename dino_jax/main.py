"""``python -m dino_jax.main --config=configs/vit_s16.py --workdir=DIR``.

The same command on a laptop CPU, one GPU, or every host of a TPU pod. The
shell around ``train.train_and_evaluate``: the flags and their one-line
errors (``cli.flags``), the distributed start, the signal handlers
(``cli.signals``), the workdir lock (``cli.lock``), the exit status.
"""

import atexit
import logging
import os
import sys

import jax
from absl import app, flags

from dino_jax import hostmem
from dino_jax.cli import console
from dino_jax.cli import flags as cli_flags

cli_flags.define_training_flags(flags.FLAGS)


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with one clear line for a bad flag or config field.

  ``-h`` / ``--help``: the entry point's help (``console.TOOLS``), exit 0.
  """
  name = console.program('__main__')
  if name not in console.TOOLS:  # imported (tests): this module's help
    name = __name__ if __name__ in console.TOOLS else 'dino_jax.main'
  return cli_flags.parse_training_flags(argv, flags.FLAGS, name)


def load_config():
  """The --config file's ConfigDict; one error line if it fails to load."""
  return cli_flags.loaded_config(flags.FLAGS)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = load_config()
  FLAGS = flags.FLAGS
  # The first line within seconds: JAX, the data and the first compile
  # take a minute on a CPU before the first step's line (process 0's).
  if not FLAGS.process_id:
    print(
      f'dino_jax.main: {config.model.arch} on {config.data.source} in '
      f'{FLAGS.workdir}; starting JAX, the data and the first '
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
  from dino_jax.cli import lock, signals
  from dino_jax.config import ConfigError
  from dino_jax.data.sources import DataError
  from dino_jax.metrics import NonFiniteLossError
  from dino_jax.storage import StorageError
  from dino_jax.workdir import WorkdirError

  # Libraries (orbax, grain) log every step of a save through absl at INFO;
  # keep those to warnings so the progress lines stay readable.
  logging.getLogger('absl').setLevel(logging.WARNING)
  console.quiet_other_processes(FLAGS.process_id or 0, FLAGS.num_processes or 1)
  parallel.initialize_distributed(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
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
    compilation_cache.cache_path(FLAGS.compilation_cache, FLAGS.workdir)
  )
  # Several processes: SIGTERM is left to JAX's preemption notifier (every
  # process stops at the same step) and a Ctrl-C is forwarded to it; one
  # process stops on its own, evaluations included.
  multiprocess = jax.process_count() > 1
  result = None
  try:
    with signals.handled(
      sigterm=not multiprocess, local=not multiprocess, forward=multiprocess
    ):
      result = train.train_and_evaluate(config, FLAGS.workdir, hold=lock.lock)
  except (
    ConfigError,
    DataError,
    DamagedCheckpointError,
    IncompatibleCheckpointError,
    NonFiniteLossError,
    StorageError,
    WorkdirError,
  ) as e:
    console.say(f'error: {e}')  # once: no absl E line as well
    sys.exit(1)
  except KeyboardInterrupt:  # a second Ctrl-C, or one before training
    pass  # below, once the traceback's frames are gone
  if result is None:
    console.say('interrupted')
    # Exit without the interpreter's teardown, after the exit handlers
    # (multiprocessing's among them: its semaphores): a second Ctrl-C exits
    # without waiting for threads of Orbax (a save in flight) or XLA, and
    # such a thread crashed the teardown once (SIGSEGV, seen after a second
    # Ctrl-C during the first compile).
    signals.ctrl_c_exits()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
  if result.get('stopped_by') == 'SIGINT':
    sys.exit(130)  # the shell's convention for Ctrl-C (after the save)


if __name__ == '__main__':
  hostmem.configure()  # glibc malloc settings for XLA:CPU
  try:
    app.run(main, flags_parser=parse_flags)
  finally:  # saved, failed or stopped: a Ctrl-C in the exit ends it at once
    from dino_jax.cli import signals

    signals.ctrl_c_exits()
