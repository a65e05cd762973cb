"""``python -m dino_jax.interop``: official DINO ``.pth`` files <-> workdirs.

  python -m dino_jax.interop import IN.pth OUT_WORKDIR --config=CONFIG \\
    [--config.a.b=c]
  python -m dino_jax.interop export WORKDIR OUT.pth [--what=full]

The command (a tool) around the library's ``pth.import_checkpoint`` and
``pth.export_checkpoint``; the parameter conversion is
``models/convert.py``. Its names stay importable here.
"""

import sys

from absl import flags

from dino_jax.cli import flags as cli_flags
from dino_jax.models.convert import (  # noqa: F401 - names kept here
  InteropError,
  _abstract_variables,
  _torch_key,
  from_pytorch,
  load_pth,
  strip_prefixes,
  to_pytorch,
)
from dino_jax.pth import (  # noqa: F401 - names kept here
  STEP_KEY,
  export_checkpoint,
  import_checkpoint,
)


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'config',
    None,
    'import: the config file (configs/<model>.py[:arg]); overrides '
    '--config.a.b=c.',
    flag_values=values,
  )
  flags.DEFINE_enum(
    'what',
    'backbone',
    ['backbone', 'full'],
    'export: teacher backbone only, or everything.',
    flag_values=values,
  )


_USAGE = (
  'usage: python -m dino_jax.interop import IN.pth OUT_WORKDIR '
  '--config=CONFIG | export WORKDIR OUT.pth [--what=full]'
)


def main(values: flags.FlagValues, args: list[str], overrides: list[str]):
  """``python -m dino_jax.interop import|export``."""
  if len(args) != 3 or args[0] not in ('import', 'export'):
    raise InteropError(f'expected import or export and two paths; {_USAGE}')
  command, source, target = args
  if command == 'import':
    if not values.config:
      raise InteropError('import needs --config=configs/<model>.py')
    config = cli_flags.load_config_file(values.config, overrides)
    step = import_checkpoint(source, target, config)
    print(f'imported {source} into {target} (step {step})')
  else:
    if overrides:
      raise InteropError(f'export takes no config overrides: {overrides}')
    export_checkpoint(source, target, values.what)
    print(f'exported {source} to {target}')


if __name__ == '__main__':
  sys.exit(cli_flags.run_cli(define_flags, main, errors=(InteropError,)))
