"""The benchmark scripts' argument handling (their timings are not tests)."""

import os
import sys

from absl.testing import absltest

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks')
)
import train_step  # noqa: E402


class SweepArgsTest(absltest.TestCase):
  def test_sweep_points_drop_sweep_and_out_in_both_forms(self):
    argv = ['--arch', 'vit_tiny', '--sweep', 'devices', '--out', 'r.jsonl']
    argv += ['--batch=8', '--sweep=locals', '--out=s.jsonl', '--locals', '2']
    self.assertEqual(
      train_step._without(argv, ('--sweep', '--out')),
      ['--arch', 'vit_tiny', '--batch=8', '--locals', '2'],
    )

  def test_point_args_parse(self):
    args = train_step.parse_args(
      train_step._without(
        ['--arch', 'vit_tiny', '--sweep', 'devices'], ('--sweep', '--out')
      )
    )
    self.assertIsNone(args.sweep)
    self.assertEqual(args.arch, 'vit_tiny')


class SweepValuesTest(absltest.TestCase):
  def test_values_replace_defaults_and_are_not_passed_on(self):
    calls = []

    def fake_run(cmd, env, capture_output, text):
      calls.append(cmd)
      out = '{"jax_step_sec": 1.0}\n'
      return type('P', (), {'returncode': 0, 'stdout': out, 'stderr': ''})

    argv = ['--arch', 'vit_tiny', '--sweep', 'batch', '--sweep_values=2,4']
    orig = train_step.subprocess.run
    train_step.subprocess.run = fake_run
    try:
      rows = train_step.sweep(train_step.parse_args(argv), argv)
    finally:
      train_step.subprocess.run = orig
    self.assertEqual([c[-1] for c in calls], ['2', '4'])
    self.assertEqual([c[-2] for c in calls], ['--batch', '--batch'])
    self.assertTrue(all('--sweep_values=2,4' not in c for c in calls))
    self.assertEqual([r['sweep'] for r in rows], ['batch', 'batch'])

  def test_bad_values_name_the_flag(self):
    argv = ['--sweep', 'batch', '--sweep_values', '4,x']
    with self.assertRaisesRegex(SystemExit, "--sweep_values='4,x'"):
      train_step.sweep(train_step.parse_args(argv), argv)


if __name__ == '__main__':
  absltest.main()
