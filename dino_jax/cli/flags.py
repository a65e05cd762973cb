"""The shell's flags: one module for every entry point.

Every ``python -m dino_jax.X`` command reads its command line here: the
shared flags (``--config``, ``--workdir``, the distributed flags), the
``--config.a.b=c`` overrides (split off, parsed as ml_collections parses
them), config files, and the one line that replaces absl's and
ml_collections' errors (a flag error ``flag --x=y: why``, an AttributeError
wrapping a KeyError for an unknown ``--config.*`` field, an OSError deferred
to the first read of a config file that failed to load, a config file's own
exception, messages spread over lines). ``run_cli`` runs an evaluation or
conversion tool: flags, help, overrides, distributed start, signals,
``error:`` lines and exit codes. ``python -m dino_jax.main`` uses the same
pieces (``define_training_flags``, ``parse_training_flags``,
``loaded_config``).
"""

import logging
import signal
import sys
from collections.abc import Callable

import ml_collections
from absl import flags
from ml_collections import config_flags

from dino_jax import checkpoint as checkpoint_lib
from dino_jax import storage
from dino_jax.cli import console
from dino_jax.overrides import (
  FIELDS_HINT,
  OVERRIDE_PREFIXES,
  ConfigOverrideError,
  apply_overrides,
  lines_of,
  override_error,
  reason,
  split_flag,
  split_overrides,
)
from dino_jax.workdir import WorkdirError

__all__ = [  # re-exported: what every entry point reads its command line with
  'ConfigOverrideError',
  'apply_overrides',
  'split_overrides',
]

logger = logging.getLogger(__name__)

CONFIG_HINT = 'pass a config file such as configs/vit_s16.py'
FLAGS_HINT = 'pass --helpfull for the flags'


def flag_error(error: BaseException) -> str:
  """A flag absl refuses (unknown, missing, a bad value)."""
  return f'{reason(error)}; {FLAGS_HINT}'


def config_file_error(spec: str, error: BaseException) -> str:
  """``--config=SPEC`` that does not load, and why: the innermost error's
  last line (ml_collections lists the paths it tried above the reason)."""
  while error.__cause__ is not None:
    error = error.__cause__
  flag, why = split_flag(error)
  if flag is None:
    lines = lines_of(error)
    why = lines[-1] if lines else type(error).__name__
  return f'--config={spec} cannot be loaded ({why}); {CONFIG_HINT}'


def command_line_error(error: BaseException, argv: list[str]) -> str:
  """The line for an error raised while absl parsed ``argv``, a command
  line with a ``--config`` file flag (``dino_jax.main``)."""
  overrides = [a for a in argv if a.startswith(OVERRIDE_PREFIXES)]
  if isinstance(error, (AttributeError, KeyError)) and overrides:
    names = ' '.join(a.split('=', 1)[0] for a in overrides)
    return f'unknown config field in {names}: {reason(error)}; {FIELDS_HINT}'
  is_flag, text = isinstance(error, flags.Error), str(error)
  if is_flag and text.startswith(('flag --config.', 'flag --noconfig.')):
    return override_error(overrides, error)
  spec = _value(argv, 'config')
  if spec and (not is_flag or text.startswith('flag --config=')):
    return config_file_error(spec, error)  # the config file's own error
  return flag_error(error)


def _value(argv: list[str], name: str) -> str | None:
  """The value of ``--name=value`` or ``--name value`` in ``argv``."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


# python -m dino_jax.main: its flags, its parse, its config.


def define_distributed_flags(values: flags.FlagValues) -> None:
  """The flags for multi-process runs without auto-detection."""
  flags.DEFINE_string(
    'coordinator_address',
    None,
    'host:port of process 0 for multi-process runs without TPU/SLURM '
    'auto-detection (with --num_processes and --process_id).',
    flag_values=values,
  )
  flags.DEFINE_integer(
    'num_processes', None, 'Processes in the run.', flag_values=values
  )
  flags.DEFINE_integer('process_id', None, 'This process.', flag_values=values)


def define_training_flags(values: flags.FlagValues) -> None:
  """``python -m dino_jax.main``'s flags: --workdir, the distributed ones,
  --compilation_cache and the --config file (both required)."""
  flags.DEFINE_string(
    'workdir',
    None,
    'Checkpoints, metrics and evaluations.',
    flag_values=values,
  )
  define_distributed_flags(values)
  flags.DEFINE_string(
    'compilation_cache',
    '',
    "JAX's persistent compilation cache: a local or gs:// directory; "
    'default WORKDIR/compilation_cache (a restart loads the step instead of '
    "compiling it again); 'none' turns it off.",
    flag_values=values,
  )
  config_flags.DEFINE_config_file(
    'config',
    None,
    'Training config file.',
    flag_values=values,
    lock_config=True,
  )
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=values)


def parse_training_flags(
  argv: list[str], values: flags.FlagValues, name: str
) -> list[str]:
  """absl parsing of a command line with a ``--config`` file flag, with one
  clear line for a bad flag or config field (exit 1).

  ``-h`` / ``--help``: the help of the entry point ``name``
  (``console.TOOLS``), exit 0.
  """
  if console.wants_help(argv):
    console.print_help(console.tool_help(name, values))
  try:
    return values(argv)
  except Exception as e:  # noqa: BLE001 - a config file raises its own
    console.say(f'error: {command_line_error(e, argv)}')
  sys.exit(1)


def loaded_config(values: flags.FlagValues) -> ml_collections.ConfigDict:
  """The --config file's ConfigDict; one error line (exit 1) if it failed
  to load."""
  config = values.config
  try:
    config.keys()  # a placeholder that raises if the file failed to load
    return config
  except OSError as e:  # ml_collections defers a failed load to here
    spec = values['config'].serialize().split('=', 1)[-1]
    console.say(f'error: {config_file_error(spec, e)}')
    sys.exit(1)


# Config files.


def load_config_file(
  spec: str, overrides: list[str] = ()
) -> ml_collections.ConfigDict:
  """``--config=FILE[:ARG]`` plus overrides, as ``dino_jax.main`` reads it.

  Raises:
    ConfigOverrideError: the file does not load, or an override fails.
  """
  values = flags.FlagValues()
  argv = ['dino_jax', f'--config={spec}']
  config_flags.DEFINE_config_file(
    'config', None, flag_values=values, lock_config=True, sys_argv=argv
  )
  try:
    values(argv)
    config = values.config
    config.keys()  # a file that failed to load raises here
  except Exception as e:  # noqa: BLE001 - the config file's own error
    raise ConfigOverrideError(config_file_error(spec, e)) from e
  return apply_overrides(config, list(overrides))


# What every evaluation tool shares: --workdir, --pretrained, --config.


def define_eval_flags(values: flags.FlagValues) -> None:
  """--workdir, --pretrained and --config, as every evaluation takes them."""
  kw = {'flag_values': values}
  flags.DEFINE_string(
    'workdir',
    None,
    'Training workdir (its newest checkpoint; results go to WORKDIR/eval/).',
    **kw,
  )
  flags.DEFINE_string(
    'pretrained',
    None,
    'An official DINO .pth (backbone-only or full checkpoint): imported '
    'into a new --workdir first (needs --config for the architecture).',
    **kw,
  )
  flags.DEFINE_string(
    'config',
    None,
    'With --pretrained: the config file (configs/<model>.py[:arg]). '
    'Overrides: --config.a.b=c (of this file, or of the workdir config).',
    **kw,
  )


# The runner of the evaluation and conversion tools.


def _run_tool(main, args, reported) -> int:
  """``main(*args)``; the exit status, after one line for an error or a
  signal.

  SIGTERM and Ctrl-C are recorded (``interrupt``): the tool stops at its
  next ``interrupt.check()`` (between batches), its outputs whole (written
  atomically), its data workers stopped.
  """
  from dino_jax import interrupt
  from dino_jax.cli import signals

  with signals.handled(announce=signals.STOPPING):
    try:
      main(*args)
      interrupt.check()  # a signal near the end still stops with its status
    except reported as e:
      console.say(f'error: {e}')
      return 1
    except (KeyboardInterrupt, interrupt.Stopped) as e:
      if isinstance(e, interrupt.Stopped) and e.signal_name == 'SIGTERM':
        console.say('stopped by SIGTERM')
        return 128 + signal.SIGTERM
      console.say('interrupted')
      return 130
  return 0


def run_cli(
  define_flags: Callable[[flags.FlagValues], None],
  main: Callable[[flags.FlagValues, list[str], list[str]], None],
  argv: list[str] | None = None,
  *,
  errors: tuple[type[BaseException], ...] = (),
  program: str | None = None,
) -> int:
  """Runs a dino_jax tool: flags, ``--config.*`` overrides, one-line errors.

  Args:
    define_flags: defines the tool's flags on the FlagValues it is given.
    main: ``main(flag_values, positional_args, overrides)``.
    argv: the command line; None: ``sys.argv``, through ``absl.app.run``.
      Tests pass a list: the flags then live in a fresh FlagValues.
    errors: further exception types reported as ``error: <message>``
      (WorkdirError, ConfigOverrideError and the checkpoint errors always
      are).
    program: the entry point's module, whose help ``-h`` prints (None: the
      module of ``main``).

  Returns:
    The exit status: 0, or 1 after one ``error: ...`` line on stderr.
  """
  from absl import app

  values = flags.FLAGS if argv is None else flags.FlagValues()
  define_flags(values)
  define_distributed_flags(values)
  reported = (
    WorkdirError,
    ConfigOverrideError,
    checkpoint_lib.DamagedCheckpointError,
    checkpoint_lib.IncompatibleCheckpointError,
    storage.StorageError,
    *errors,
  )

  def parse(args: list[str]) -> list[str]:
    if console.wants_help(args):
      name = program or console.program(main.__module__)
      console.print_help(console.tool_help(name, values))
    try:
      rest, overrides = split_overrides(args)
      return [*values(rest), *overrides]
    except (flags.Error, ConfigOverrideError) as e:
      console.say(f'error: {flag_error(e)}')
      sys.exit(1)

  def run(args: list[str]) -> int:
    # Libraries (orbax, grain) log every step of a restore through absl.
    logging.getLogger('absl').setLevel(logging.WARNING)
    overrides = [a for a in args[1:] if a.startswith(OVERRIDE_PREFIXES)]
    positional = [a for a in args[1:] if a not in overrides]
    from dino_jax import parallel

    # Every process of a pod or a SLURM job runs the tool; they evaluate
    # together, as in training (auto-detected, or these flags).
    console.quiet_other_processes(
      values.process_id or 0, values.num_processes or 1
    )
    parallel.initialize_distributed(
      values.coordinator_address, values.num_processes, values.process_id
    )
    import jax

    console.quiet_other_processes(jax.process_index(), jax.process_count())
    return _run_tool(main, (values, positional, overrides), reported)

  if argv is None:  # the program
    from dino_jax.cli import signals

    try:
      app.run(run, flags_parser=parse)
    finally:  # a Ctrl-C in the interpreter's exit ends it at once
      signals.ctrl_c_exits()
  try:
    return run(parse(argv))
  except SystemExit as e:
    return int(e.code or 0)
