"""The benchmark scripts' argument handling (their timings are not tests)."""

import contextlib
import io
import os
import shutil
import sys
import tempfile
import types

from absl.testing import absltest

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks')
)
import block  # noqa: E402
import host_pipeline  # noqa: E402
import timing  # noqa: E402
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

  def test_device_points_drop_the_one_device_malloc_settings(self):
    from dino_jax import hostmem

    envs = []

    def fake_run(cmd, env, capture_output, text):
      envs.append(env)
      out = '{"jax_step_sec": 1.0}\n'
      return type('P', (), {'returncode': 0, 'stdout': out, 'stderr': ''})

    argv = ['--sweep', 'devices', '--sweep_values=1,8']
    orig_run, orig_env = train_step.subprocess.run, dict(os.environ)
    train_step.subprocess.run = fake_run
    try:
      train_step.sweep(train_step.parse_args(argv), argv)
    finally:
      train_step.subprocess.run = orig_run
      os.environ.clear()
      os.environ.update(orig_env)
    # The one-device point makes the settings, the 8-device one does not.
    choices = [hostmem.choice(env, 'linux', True) for env in envs]
    self.assertEqual(choices, ['tuned', 'system'])
    self.assertIn('=8', envs[1]['XLA_FLAGS'])

  def test_bad_values_name_the_flag(self):
    argv = ['--sweep', 'batch', '--sweep_values', '4,x']
    with self.assertRaisesRegex(SystemExit, "--sweep_values='4,x'"):
      train_step.sweep(train_step.parse_args(argv), argv)


class SummarizeTest(absltest.TestCase):
  def test_median_min_and_ratios_against_the_reference(self):
    times = {'jax': [3.0, 1.0, 2.0], 'torch': [4.0, 2.0, 9.0]}
    out = timing.summarize(times, suffix='_step')
    self.assertEqual(out['jax_step_sec'], 2.0)
    self.assertEqual(out['jax_step_sec_min'], 1.0)
    self.assertEqual(out['torch_step_sec'], 4.0)
    self.assertEqual(out['ratio_jax_over_torch'], 2.0)  # 4 / 2
    self.assertEqual(out['ratio_jax_over_torch_min'], 2.0)  # 2 / 1
    self.assertNotIn('ratio_torch_over_torch', out)

  def test_ratio_suffix_and_no_reference(self):
    out = timing.summarize(
      {'jax': [1.0], 'torch': [3.0]}, suffix='_fwd', ratio_suffix='_fwd'
    )
    self.assertEqual(out['ratio_jax_fwd_over_torch'], 3.0)
    out = timing.summarize({'jax': [1.0, 5.0]})
    self.assertEqual(out, {'jax_sec': 3.0, 'jax_sec_min': 1.0})

  def test_empty_side_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "'jax'"):
      timing.summarize({'jax': []})

  def test_interleaved_runs_sides_in_turns_after_warmup(self):
    calls = []
    runs = {'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}
    times = timing.interleaved(runs, steps=2, warmup=1)
    self.assertEqual(calls, ['a', 'b', 'a', 'b', 'a', 'b'])
    self.assertEqual({k: len(v) for k, v in times.items()}, {'a': 2, 'b': 2})
    with self.assertRaisesRegex(ValueError, 'steps must be >= 1; got 0'):
      timing.interleaved(runs, steps=0)


class BlockBenchmarkTest(absltest.TestCase):
  def test_bad_args_name_the_value(self):
    for argv, msg in (
      (['--tokens', '0'], '--tokens must be >= 1; got 0'),
      (['--sides', 'jax,tf'], "unknown \\['tf'\\]"),
    ):
      err = io.StringIO()
      with self.assertRaises(SystemExit), contextlib.redirect_stderr(err):
        block.parse_args(argv)
      self.assertRegex(err.getvalue(), msg)

  def test_jax_side_runs_and_counts_flops(self):
    args = block.parse_args(
      ['--arch', 'vit_tiny', '--batch', '2', '--tokens', '5']
    )
    runs, flops = block.jax_side(args)
    self.assertEqual(set(runs), {'jax', 'jax_fwd'})
    grads = runs['jax']()
    self.assertEqual(grads[1].shape, (2, 5, 192))  # input gradient
    # The backward pass costs about twice the forward in matmul FLOPs.
    self.assertBetween(flops['jax'] / flops['jax_fwd'], 2.5, 3.5)


class TrainStepRowTest(absltest.TestCase):
  def test_plan_total_counts_donated_outputs_once(self):
    mem = types.SimpleNamespace(
      argument_size_in_bytes=100,
      temp_size_in_bytes=50,
      output_size_in_bytes=90,
      alias_size_in_bytes=80,
    )
    plan = train_step.plan_bytes(mem)
    self.assertEqual(plan['total_bytes'], 100 + 90 + 50 - 80)
    self.assertEqual(plan['temp_bytes'], 50)

  def test_defaults_are_auto_and_resolve_to_float32_on_cpu(self):
    from dino_jax import config as config_lib
    from dino_jax import flops

    args = train_step.parse_args(['--batch', '4'])
    config = train_step.make_config(args)
    self.assertEqual(
      (config.model.dtype, config.model.attention), ('auto',) * 2
    )
    self.assertEqual(
      config_lib.resolve_compute(config.model), ('float32', 'einsum')
    )
    # ViT-S/16, 2 x 224 + 8 x 96, K 65536: ~113 GFLOPs per image.
    per_image = flops.from_config(config)['per_image']
    self.assertAlmostEqual(per_image / 1e9, 113.46, delta=0.01)


class HostPipelineTest(absltest.TestCase):
  def test_rates_and_cores(self):
    row = host_pipeline.rates(1000, wall=2.0, cpu=4.0, targets=(1000,))
    self.assertEqual(row['images_per_sec'], 500.0)
    self.assertEqual(row['images_per_cpu_sec'], 250.0)
    self.assertEqual(row['cores_for_1000'], 4.0)

  def test_jpegs_decode_onto_the_canvas(self):
    from dino_jax.data import sources

    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp)
    kb = host_pipeline.make_jpegs(tmp, 3)
    self.assertBetween(kb, 20, 300)
    source = sources.ImageFolderSource(tmp)
    self.assertLen(source, 3)
    row = host_pipeline.decode_row(source, 512, (1380,))
    self.assertEqual((row['stage'], row['images']), ('decode', 3))
    self.assertGreater(row['cores_for_1380'], 0)
    from dino_jax.data import pipeline

    out = pipeline.DecodedSource(source, 512)[0]
    self.assertEqual(out['image'].shape, (512, 512, 3))
    self.assertEqual(out['size'].tolist(), [375, 500])


if __name__ == '__main__':
  absltest.main()
