"""Checkpoints: state and iterator round trip; restore under another mesh."""

import functools
import json
import logging
import os
import re
import sys
import types

import chex
import jax
from absl.testing import absltest
from tiny import tiny_config

from dino_jax import checkpoint as checkpoint_lib
from dino_jax import parallel
from dino_jax import step as step_lib
from dino_jax.config import default_config

README = os.path.join(os.path.dirname(__file__), '..', 'README.md')


def make_state(config):
  sched = step_lib.Schedules.from_config(config, 5)
  student, _ = step_lib.build_models(config)
  tx = step_lib.build_optimizer(config, sched)
  return functools.partial(
    step_lib.init_state,
    jax.random.PRNGKey(0),
    student,
    tx,
    config.crops.global_size,
    config.model.out_dim,
  )


class CheckpointTest(absltest.TestCase):
  def test_restore_under_another_mesh(self):
    config = tiny_config()
    init_fn = make_state(config)
    shape = jax.eval_shape(init_fn)
    replicated = parallel.make_mesh(devices=jax.devices()[:8])
    state = jax.jit(
      init_fn, out_shardings=parallel.state_sharding(replicated, shape)
    )()
    directory = self.create_tempdir().full_path
    ckpt = checkpoint_lib.Checkpointer(directory)
    ckpt.save(7, state, config)
    ckpt.wait()
    self.assertEqual(ckpt.manager.all_steps(), [7])
    self.assertEqual(ckpt.saved_config(7)['model']['embed_dim'], 32)

    fsdp = parallel.make_mesh(data=2, fsdp=4)
    target = parallel.state_sharding(fsdp, shape, 256)
    restored = ckpt.restore(7, checkpoint_lib.abstract_like(shape, target))
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    kernel = restored.student['head']['mlp_0']['kernel']
    self.assertIn('fsdp', kernel.sharding.spec)
    single = parallel.make_mesh(devices=jax.devices()[:1])
    again = ckpt.restore(
      7,
      checkpoint_lib.abstract_like(
        shape, parallel.state_sharding(single, shape)
      ),
    )
    chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(state))
    ckpt.close()

  def test_fallout_of_a_failed_read_stays_off_stderr(self):
    # A restore of a damaged checkpoint fails at its first bad read; the
    # reads it abandons then report through asyncio's logger and the
    # unraisable hook. CI once showed a traceback from asyncio's
    # '_GatheringFuture exception was never retrieved', which names only
    # the TensorStore read; it is told apart by Orbax's frames.
    fake = '/site-packages/orbax/checkpoint/_src/serialization/fake.py'
    namespace = {}
    exec(
      compile(
        'def read():\n  raise ValueError("OUT_OF_RANGE")\n', fake, 'exec'
      ),
      namespace,
    )
    try:
      namespace['read']()
    except ValueError as e:
      orbax_error = e
    try:
      raise KeyError('mine')
    except KeyError as e:
      own_error = e
    checkpoint_lib._quiet_failed_reads()
    asyncio_logger = logging.getLogger('asyncio')
    with self.assertLogs(asyncio_logger, 'ERROR') as logs:
      asyncio_logger.error(
        '_GatheringFuture exception was never retrieved\nfuture: <...>',
        exc_info=(ValueError, orbax_error, orbax_error.__traceback__),
      )
      asyncio_logger.error(
        'Task exception was never retrieved\nfuture: <Task coro=<own()>>',
        exc_info=(KeyError, own_error, own_error.__traceback__),
      )
    self.assertEqual(
      [r.getMessage() for r in logs.records],
      ['Task exception was never retrieved\nfuture: <Task coro=<own()>>'],
    )
    # An unraisable exception with Orbax's frames goes to the debug log.
    with self.assertLogs(checkpoint_lib.logger, 'DEBUG') as logs:
      sys.unraisablehook(
        types.SimpleNamespace(
          exc_type=ValueError,
          exc_value=orbax_error,
          exc_traceback=orbax_error.__traceback__,
          err_msg='Exception ignored in',
          object=None,
        )
      )
    self.assertIn('after a failed restore', logs.output[0])
    self.assertIn('OUT_OF_RANGE', logs.output[0])

  def test_resume_rules(self):
    config = tiny_config()
    saved = json.loads(config.to_json())
    saved['model']['out_dim'] = 128
    saved['batch_size'] = 32
    saved['data']['num_workers'] = 7  # may change
    saved['mesh']['fsdp'] = 4  # may change
    saved['eval']['ks'] = [1]  # may change
    with self.assertRaisesRegex(
      checkpoint_lib.IncompatibleCheckpointError,
      r'another recipe: batch_size \(checkpoint 32, now 16\), model.out_dim '
      r'\(checkpoint 128, now 64\)\. Resume',
    ):
      checkpoint_lib.check_compatible(saved, config, '/w')
    same = json.loads(config.to_json())
    same['data']['num_workers'] = 7
    same['total_steps'] = 99
    checkpoint_lib.check_compatible(same, config, '/w')
    # A field the checkpoint predates counts as its default then.
    del same['crops']['blur_sigma']
    config.crops.blur_sigma = default_config().crops.blur_sigma
    checkpoint_lib.check_compatible(same, config, '/w')
    config.crops.blur_sigma = (0.2, 0.3)
    with self.assertRaisesRegex(
      checkpoint_lib.IncompatibleCheckpointError, 'crops.blur_sigma'
    ):
      checkpoint_lib.check_compatible(same, config, '/w')


def readme_fields(pattern: str) -> tuple[str, ...]:
  """The `code` names in the part of README that ``pattern`` captures."""
  with open(README) as f:
    text = ' '.join(f.read().split())
  found = re.search(pattern, text)
  assert found, f'README no longer says {pattern!r}'
  return tuple(re.findall(r'`([^`]+)`', found.group(1)))


class ContractTest(absltest.TestCase):
  # README's lists are the contract the code enforces: change both or
  # neither (checkpoint.RESUMABLE_FIELDS, checkpoint.EVAL_FIELDS).

  def test_readme_lists_the_resume_contract(self):
    self.assertEqual(
      readme_fields(r'Fields that may change on resume:(.*?)\.\s'),
      checkpoint_lib.RESUMABLE_FIELDS,
    )
    self.assertEqual(
      readme_fields(r'On a workdir, only (.*?) may be overridden'),
      checkpoint_lib.EVAL_FIELDS,
    )

  def test_every_pattern_names_config_fields(self):
    fields = checkpoint_lib._flatten(json.loads(default_config().to_json()))
    for pattern in (
      *checkpoint_lib.RESUMABLE_FIELDS,
      *checkpoint_lib.EVAL_FIELDS,
    ):
      self.assertTrue(
        any(checkpoint_lib.may_differ(f, (pattern,)) for f in fields), pattern
      )


if __name__ == '__main__':
  absltest.main()
