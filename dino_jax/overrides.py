"""``--config.a.b=c`` overrides of a ConfigDict, and their one-line errors.

Overrides are parsed as ``python -m dino_jax.main`` parses them
(ml_collections ``config_flags``: ints, floats, ``true``/``false``, tuples
as ``(1, 2)``); an unknown field or a bad value is a ``ConfigOverrideError``
whose message is one line naming the override and the reason. Reading a
checkpoint (``workdir.load_workdir``), only the groups of
``checkpoint.EVAL_FIELDS`` may be overridden: the model and recipe come
from the checkpoint.
"""

import ml_collections
from absl import flags
from ml_collections import config_flags

from dino_jax import checkpoint as checkpoint_lib

OVERRIDE_PREFIXES = ('--config.', '--noconfig.')
FIELDS_HINT = 'see the fields in dino_jax/config.py'

# Config groups an evaluation may override (checkpoint.EVAL_FIELDS).
EVAL_GROUPS = tuple(g.removesuffix('.*') for g in checkpoint_lib.EVAL_FIELDS)


class ConfigOverrideError(ValueError):
  """A config file or a ``--config.*`` override cannot be applied."""


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates ``--config.a.b=c`` overrides from the other arguments.

  Args:
    argv: the command line, program name first.

  Returns:
    (the other arguments, the overrides as ``--config.a.b=c`` strings).
  """
  rest, overrides = [], []
  for arg in argv:
    (overrides if arg.startswith(OVERRIDE_PREFIXES) else rest).append(arg)
  return rest, overrides


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: list[str]
) -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``--config.a.b=c`` overrides applied.

  The values are parsed as ``python -m dino_jax.main`` parses them
  (ml_collections ``config_flags``: ints, floats, ``true``/``false``,
  tuples as ``(1, 2)``); unknown fields are refused.

  Raises:
    ConfigOverrideError: naming the override and the reason.
  """
  config = config.copy_and_resolve_references()
  if not overrides:
    return config
  values = flags.FlagValues()
  argv = ['dino_jax', *overrides]
  try:  # an unknown field fails in DEFINE, a bad value in the parse
    config_flags.DEFINE_config_dict(
      'config', config, flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigOverrideError(override_error(overrides, e)) from e
  return values.config


def check_eval_overrides(overrides: list[str]) -> None:
  """Refuses overrides of the state's fields when reading a checkpoint."""
  for item in overrides:
    field = item.split('=', 1)[0].split('.', 1)[-1]
    if not checkpoint_lib.may_differ(field, checkpoint_lib.EVAL_FIELDS):
      raise ConfigOverrideError(
        f'{item}: the model and recipe come from the checkpoint; only '
        f'{", ".join(checkpoint_lib.EVAL_FIELDS)} may be overridden when '
        'reading a workdir'
      )


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
  lines = lines_of(error)
  if not lines:
    return type(error).__name__
  return lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}'


def override_error(overrides: list[str], error: BaseException) -> str:
  """``--config.a.b=c`` overrides that do not apply: the one absl names
  (a bad value), else all of them (an unknown field names itself)."""
  flag, why = split_flag(error)
  named = flag or ' '.join(overrides)
  return f'{named} cannot be applied: {why}; {FIELDS_HINT}'


def split_flag(error: BaseException) -> tuple[str | None, str]:
  """(``--x=y``, why) of absl's ``flag --x=y: why``; (None, reason) else."""
  text = reason(error)
  if isinstance(error, flags.Error) and text.startswith('flag --'):
    flag, _, why = text[len('flag ') :].partition(': ')
    if why:
      return flag, why
  return None, text


def lines_of(error: BaseException) -> list[str]:
  # A KeyError's str() quotes its message; an OSError's adds its errno.
  keyed = isinstance(error, KeyError) and error.args
  text = error.args[0] if keyed else str(error)
  return [
    ' '.join(line.split()) for line in str(text).splitlines() if line.strip()
  ]
