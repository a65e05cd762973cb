"""Checkpoints: state and iterator round trip; restore under another mesh."""

import functools

import chex
import grain
import jax
import numpy as np
from absl.testing import absltest
from tiny import tiny_config

from dino_jax import checkpoint as checkpoint_lib
from dino_jax import parallel
from dino_jax import step as step_lib


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
    it = iter(grain.MapDataset.range(100).to_iter_dataset().batch(4))
    next(it)
    ckpt.save(7, state, it, config)
    ckpt.wait()
    self.assertEqual(ckpt.latest_step(), 7)
    self.assertEqual(ckpt.saved_config(7)['model']['embed_dim'], 32)

    fsdp = parallel.make_mesh(data=2, fsdp=4)
    target = parallel.state_sharding(fsdp, shape, 256)
    it2 = iter(grain.MapDataset.range(100).to_iter_dataset().batch(4))
    restored = ckpt.restore(7, checkpoint_lib.abstract_like(shape, target), it2)
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
    kernel = restored.student['head']['mlp_0']['kernel']
    self.assertIn('fsdp', kernel.sharding.spec)
    np.testing.assert_array_equal(next(it2), [4, 5, 6, 7])  # iterator too
    single = parallel.make_mesh(devices=jax.devices()[:1])
    again = ckpt.restore(
      7,
      checkpoint_lib.abstract_like(
        shape, parallel.state_sharding(single, shape)
      ),
    )
    chex.assert_trees_all_equal(jax.device_get(again), jax.device_get(state))
    ckpt.close()

  def test_incompatible_config_is_named(self):
    config = tiny_config()
    saved = {'model': dict(config.model.to_dict(), out_dim=128)}
    with self.assertRaisesRegex(
      checkpoint_lib.IncompatibleCheckpointError,
      'model.out_dim: checkpoint 128, config 64',
    ):
      checkpoint_lib.check_compatible(saved, config, '/w')
    checkpoint_lib.check_compatible(
      {'model': config.model.to_dict()}, config, '/w'
    )


if __name__ == '__main__':
  absltest.main()
