"""cli.flags: one line for each way absl and ml_collections refuse a
command line (dino_jax.main's parse, the evaluation tools' config loading)."""

import os

from absl import flags
from absl.testing import absltest
from ml_collections import config_flags

from dino_jax.cli import flags as cli_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = os.path.join(ROOT, 'configs', 'fashion_mnist.py')


def main_error(*args: str) -> str:
  """The line ``dino_jax.main`` prints for ``args`` (its flags, its order:
  parse, then the first read of the config)."""
  argv = ['prog', *args]
  values = flags.FlagValues()
  flags.DEFINE_string('workdir', None, 'w', flag_values=values)
  config_flags.DEFINE_config_file(
    'config', None, flag_values=values, lock_config=True, sys_argv=argv
  )
  try:
    values(argv)
    values.config.keys()
  except Exception as e:  # noqa: BLE001 - what main catches
    return cli_flags.command_line_error(e, argv)
  raise AssertionError(f'{args} parsed')


class CommandLineErrorTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.raising = self.create_tempfile(
      'raising.py', 'def get_config():\n  return undefined_name\n'
    ).full_path

  def test_each_error_is_one_line_saying_what_to_do(self):
    cases = [
      (
        [f'--config={FASHION}', '--config.optim.lrr=1'],
        r'^unknown config field in --config.optim.lrr: .*Did you mean "lr" '
        r'instead of "lrr".*; see the fields in dino_jax/config.py$',
      ),
      (
        [f'--config={FASHION}', '--config.seed=1', '--config.optim.lr=x'],
        r'^--config.optim.lr=x cannot be applied: .*x.*; see the fields',
      ),
      (
        [f'--config={FASHION}', '--foo=1'],
        r"^Unknown command line flag 'foo'.*; pass --helpfull for the flags$",
      ),
      (
        ['--config=no_such.py'],
        r'^--config=no_such.py cannot be loaded \(\[Errno 2\] No such file '
        r".*'no_such.py'\); pass a config file such as configs/vit_s16.py$",
      ),
      (
        [f'--config={FASHION}:tpu'],
        rf"^--config={FASHION}:tpu cannot be loaded \(.*variant 'tpu' "
        r'unknown.*\); pass a config file',
      ),
      (
        [f'--config={self.raising}'],
        rf"^--config={self.raising} cannot be loaded \(name 'undefined_name' "
        r'is not defined\)',
      ),
    ]
    for args, pattern in cases:
      line = main_error(*args)
      self.assertRegex(line, pattern)
      self.assertNotIn('\n', line)

  def test_the_evaluation_tools_say_the_same(self):
    # workdir.load_config_file: the same reason as dino_jax.main gives.
    for spec in ('no_such.py', f'{FASHION}:tpu', self.raising):
      with self.assertRaises(cli_flags.ConfigOverrideError) as caught:
        cli_flags.load_config_file(spec)
      self.assertEqual(str(caught.exception), main_error(f'--config={spec}'))


if __name__ == '__main__':
  absltest.main()
