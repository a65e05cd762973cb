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


if __name__ == '__main__':
  absltest.main()
