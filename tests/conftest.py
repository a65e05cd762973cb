"""Test setup: 8 fake CPU devices, set before JAX starts."""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_threefry_partitionable', True)

from absl import flags  # noqa: E402

# absltest helpers and grain workers read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()
