"""One line for a bad command line: flags, config files, ``--config.*``.

absl and ml_collections report a bad command line in several shapes: a flag
error (``flag --x=y: why``), an AttributeError wrapping a KeyError for an
unknown ``--config.*`` field, an OSError deferred to the first read of a
config file that failed to load, a config file's own exception, messages
spread over lines (the paths tried, a traceback). ``python -m
dino_jax.main`` and the evaluation tools (``workdir.run_cli``,
``workdir.apply_overrides``, ``workdir.load_config_file``) turn them into
one line with the functions here, which say what is wrong and what to do.
"""

from absl import flags

OVERRIDE_PREFIXES = ('--config.', '--noconfig.')
CONFIG_HINT = 'pass a config file such as configs/vit_s16.py'
FIELDS_HINT = 'see the fields in dino_jax/config.py'
FLAGS_HINT = 'pass --helpfull for the flags'


class ConfigOverrideError(ValueError):
  """A config file or a ``--config.*`` override cannot be applied."""


def reason(error: BaseException) -> str:
  """What went wrong, in one line.

  Unwraps absl's AttributeError(KeyError(message)); of a message on several
  lines (a config file's traceback) keeps the first and the last, which say
  what is wrong.
  """
  while isinstance(error, (AttributeError, KeyError)) and error.args:
    if not isinstance(error.args[0], BaseException):
      break
    error = error.args[0]
  lines = _lines(error)
  if not lines:
    return type(error).__name__
  return lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}'


def flag_error(error: BaseException) -> str:
  """A flag absl refuses (unknown, missing, a bad value)."""
  return f'{reason(error)}; {FLAGS_HINT}'


def config_file_error(spec: str, error: BaseException) -> str:
  """``--config=SPEC`` that does not load, and why: the innermost error's
  last line (ml_collections lists the paths it tried above the reason)."""
  while error.__cause__ is not None:
    error = error.__cause__
  flag, why = _split_flag(error)
  if flag is None:
    lines = _lines(error)
    why = lines[-1] if lines else type(error).__name__
  return f'--config={spec} cannot be loaded ({why}); {CONFIG_HINT}'


def override_error(overrides: list[str], error: BaseException) -> str:
  """``--config.a.b=c`` overrides that do not apply: the one absl names
  (a bad value), else all of them (an unknown field names itself)."""
  flag, why = _split_flag(error)
  named = flag or ' '.join(overrides)
  return f'{named} cannot be applied: {why}; {FIELDS_HINT}'


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


def _split_flag(error: BaseException) -> tuple[str | None, str]:
  """(``--x=y``, why) of absl's ``flag --x=y: why``; (None, reason) else."""
  text = reason(error)
  if isinstance(error, flags.Error) and text.startswith('flag --'):
    flag, _, why = text[len('flag ') :].partition(': ')
    if why:
      return flag, why
  return None, text


def _lines(error: BaseException) -> list[str]:
  # A KeyError's str() quotes its message; an OSError's adds its errno.
  keyed = isinstance(error, KeyError) and error.args
  text = error.args[0] if keyed else str(error)
  return [
    ' '.join(line.split()) for line in str(text).splitlines() if line.strip()
  ]


def _value(argv: list[str], name: str) -> str | None:
  """The value of ``--name=value`` or ``--name value`` in ``argv``."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None
