"""The evaluation and interop CLIs: --config.* overrides, one-line errors."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny_config
import torch
from absl.testing import absltest, parameterized
from test_cli import (
  ROOT,
  TINY,
  env,
  group_exited,
  read_text,
  start_command,
  wait_for,
)

from dino_jax import checkpoint as checkpoint_lib
from dino_jax import interop, models
from dino_jax import overrides as overrides_lib
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib
from dino_jax.cli import evals
from dino_jax.cli import flags as cli_flags
from dino_jax.evaluation import attention, knn, linear


def run_in_process(module, argv, main=None):
  """(exit status, stderr) of ``module``'s CLI run with ``argv``."""
  if module is interop:
    define, default_main = interop.define_flags, interop.main
  else:  # python -m dino_jax.eval.<name>: its command is the shell's
    define, default_main = evals.command(module.__name__.rsplit('.', 1)[1])
  stderr = io.StringIO()
  with contextlib.redirect_stderr(stderr):
    status = cli_flags.run_cli(
      define,
      main or default_main,
      ['prog', *argv],
      errors=(interop.InteropError,),
    )
  return status, stderr.getvalue()


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith('error:')]


def run_cli(module, *args):
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    env=env(),
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )


def tiny_workdir(path):
  """A workdir holding the tiny config's initial state at step 0."""
  config = tiny_config.get_config()
  _, _, init_fn = step_lib.state_template(config)
  ckpt = checkpoint_lib.Checkpointer(f'{path}/checkpoints', async_save=False)
  ckpt.save(0, init_fn(), config)
  ckpt.wait()
  ckpt.close()
  return config


class OverrideTest(absltest.TestCase):
  def test_every_cli_takes_config_overrides_and_no_set(self):
    seen = []
    record = lambda values, args, overrides: seen.append((args, overrides))  # noqa: E731
    cases = [
      (knn, ['--workdir=w', '--config.eval.ks=(3,)']),
      (linear, ['--workdir=w', '--config.linear.epochs=2']),
      (
        attention,
        ['--workdir=w', '--image=x.png', '--config.eval.crop_size=8'],
      ),
      (interop, ['export', 'w', 'o.pth', '--noconfig.eval.knn']),
    ]
    for module, argv in cases:
      status, stderr = run_in_process(module, argv, record)
      self.assertEqual((status, stderr), (0, ''), module.__name__)
    self.assertEqual(
      seen,
      [
        ([], ['--config.eval.ks=(3,)']),
        ([], ['--config.linear.epochs=2']),
        ([], ['--config.eval.crop_size=8']),
        (['export', 'w', 'o.pth'], ['--noconfig.eval.knn']),
      ],
    )
    # --set (the older form) is gone: one error line, nothing run.
    seen.clear()
    status, stderr = run_in_process(
      knn, ['--workdir=w', '--set', 'eval.ks=(1, 2)'], record
    )
    self.assertEqual(status, 1)
    self.assertEqual(
      stderr,
      "error: Unknown command line flag 'set'; pass --helpfull for the flags\n",
    )
    self.assertEqual(seen, [])

  def test_overrides_apply_to_the_saved_config_with_its_types(self):
    saved = json.loads(tiny_config.get_config().to_json())
    config = workdir_lib.config_from_saved(saved)
    self.assertEqual(config.eval.ks, (2, 4))  # a tuple again, not a list
    new = overrides_lib.apply_overrides(
      config,
      [
        '--config.eval.ks=(3, 5)',
        '--config.eval.batch_size=16',
        '--noconfig.eval.knn',
        '--config.data.path=/data',
      ],
    )
    self.assertEqual(new.eval.ks, (3, 5))
    self.assertEqual(new.eval.batch_size, 16)
    self.assertFalse(new.eval.knn)
    self.assertEqual(new.data.path, '/data')
    self.assertEqual(config.eval.ks, (2, 4))  # the original is unchanged
    with self.assertRaisesRegex(
      workdir_lib.ConfigOverrideError, r'--config.eval.kss=1 cannot be'
    ):
      overrides_lib.apply_overrides(config, ['--config.eval.kss=1'])
    with self.assertRaisesRegex(
      workdir_lib.ConfigOverrideError, 'invalid literal for int'
    ):
      overrides_lib.apply_overrides(config, ['--config.eval.batch_size=x'])
    with self.assertRaisesRegex(
      workdir_lib.ConfigOverrideError,
      r'--config.model.depth=3: the model and recipe come from the '
      r'checkpoint; only eval.\*, linear.\*, data.\*, mesh.\* may be',
    ):
      overrides_lib.check_eval_overrides(['--config.model.depth=3'])
    loaded = cli_flags.load_config_file(TINY, ['--config.model.depth=3'])
    self.assertEqual(loaded.model.depth, 3)
    self.assertEqual(loaded.model.embed_dim, 32)


class ErrorTest(absltest.TestCase):
  def assert_one_error(self, status, stderr, value):
    self.assertEqual(status, 1, stderr)
    lines = error_lines(stderr)
    self.assertLen(lines, 1, stderr)
    self.assertIn(value, lines[0])
    self.assertNotIn('Traceback', stderr)

  def test_in_process_errors_create_nothing(self):
    root = self.create_tempdir().full_path
    empty = os.path.join(root, 'empty')
    os.mkdir(empty)
    status, stderr = run_in_process(knn, [f'--workdir={empty}'])
    self.assert_one_error(status, stderr, f'--workdir={empty} holds no')
    self.assertEqual(os.listdir(empty), [])  # no checkpoints/ made
    for module in (linear, attention):
      argv = [f'--workdir={root}/none', f'--image={ROOT}/README.md']
      status, stderr = run_in_process(module, argv[: 1 + (module is attention)])
      self.assert_one_error(status, stderr, f'--workdir={root}/none does not')
    # A .pth of another architecture (embed_dim 48, the config says 32).
    vit = models.VisionTransformer(
      patch_size=8, embed_dim=48, depth=2, num_heads=2, img_size=32
    )
    variables = vit.init(jax.random.key(0), np.zeros((1, 32, 32, 3)))
    other = os.path.join(root, 'vit48.pth')
    torch.save(
      {
        k: torch.from_numpy(np.array(v))
        for k, v in interop.to_pytorch(variables, vit).items()
      },
      other,
    )
    new = os.path.join(root, 'new', 'work')
    status, stderr = run_in_process(
      knn, [f'--pretrained={other}', f'--config={TINY}', f'--workdir={new}']
    )
    self.assert_one_error(
      status, stderr, f'{other} does not fit the model of the config'
    )
    self.assertIn('mis-shaped', error_lines(stderr)[0])
    status, stderr = run_in_process(
      interop, ['import', os.path.join(root, 'no.pth'), new, f'--config={TINY}']
    )
    self.assert_one_error(status, stderr, f'{root}/no.pth is not a file')
    self.assertFalse(os.path.exists(os.path.join(root, 'new')))
    # A .pth that is no checkpoint: no workdir made for it.
    root = self.create_tempdir().full_path
    text = os.path.join(root, 'notes.pth')
    with open(text, 'w') as f:
      f.write('not a checkpoint\n')
    work = os.path.join(root, 'work')
    status, stderr = run_in_process(
      knn, [f'--pretrained={text}', f'--config={TINY}', f'--workdir={work}']
    )
    self.assert_one_error(
      status, stderr, f'{text}: not a tensor-only checkpoint'
    )
    self.assertEqual(os.listdir(root), ['notes.pth'])  # no workdir


@pytest.mark.slow
class SubprocessTest(parameterized.TestCase):
  def assert_one_error(self, result, value):
    self.assertNotEqual(result.returncode, 0, result.stderr)
    lines = error_lines(result.stderr)
    self.assertLen(lines, 1, result.stderr)
    self.assertIn(value, lines[0])
    self.assertNotIn('Traceback', result.stderr)

  def test_errors_are_one_line_and_create_nothing(self):
    root = self.create_tempdir().full_path
    missing = os.path.join(root, 'nonexistent')
    result = run_cli('dino_jax.eval.knn', f'--workdir={missing}')
    self.assert_one_error(result, f'--workdir={missing} does not exist')
    self.assertEqual(os.listdir(root), [])

  def test_knn_on_a_workdir_with_overrides(self):
    workdir = self.create_tempdir().full_path
    tiny_workdir(workdir)
    result = run_cli(
      'dino_jax.eval.knn',
      f'--workdir={workdir}',
      '--config.eval.ks=(3,)',
      '--config.eval.max_test_images=8',
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('k-NN trained (step 0)', result.stdout)
    self.assertRegex(result.stdout, r'\n\s+3\s+\d+\.\d\d\s+\d+\.\d\d')
    self.assertIn('64 memory, 8 queries', result.stderr)
    with open(os.path.join(workdir, 'eval', 'knn.json')) as f:
      saved = json.load(f)
    self.assertEqual(saved['step'], 0)
    self.assertEqual(set(saved['trained']), {'3'})

  @parameterized.parameters(
    ('SIGTERM', 143, 'stopped by SIGTERM'),
    ('SIGINT', 130, 'interrupted'),
  )
  def test_signal_to_group_stops_cleanly(self, name, status, line):
    # A scheduler's SIGTERM, or Ctrl-C, to the group while the data workers
    # start: one line, no traceback (the workers start with the signals
    # held), no result file, no data worker or leak left behind.
    workdir = self.create_tempdir().full_path
    tiny_workdir(workdir)
    log = os.path.join(self.create_tempdir().full_path, 'stderr.txt')
    # Started with SIGINT ignored, as by a background job (and by some test
    # runners): Ctrl-C must still stop the tool.
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(log, 'w') as stderr:
      proc = start_command(
        [
          sys.executable,
          '-m',
          'dino_jax.eval.knn',
          f'--workdir={workdir}',
          '--config.data.num_workers=2',
          '--config.data.synthetic_delay=0.3',  # extraction: ~10 s
        ],
        stderr=stderr,
      )
      signal.signal(signal.SIGINT, inherited)
      wait_for(lambda: 'model compute' in read_text(log))
      time.sleep(1.5)  # the workers are importing
      os.killpg(proc.pid, getattr(signal, name))
      proc.wait(timeout=120)
    text = read_text(log)
    self.assertEqual(proc.returncode, status, text[-3000:])
    self.assertIn(line, text)
    for bad in ('Traceback', 'leaked', 'k-NN (trained)'):
      self.assertNotIn(bad, text)
    wait_for(lambda: group_exited(proc.pid), timeout=10)
    self.assertFalse(os.path.exists(os.path.join(workdir, 'eval')))


if __name__ == '__main__':
  absltest.main()
