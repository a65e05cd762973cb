"""Test setup: 8 fake CPU devices, set before JAX starts."""

import atexit
import os
import shutil
import tempfile

# XLA:CPU's elemental fusion emitters instead of its newer MLIR ones: they
# compile the tiny train step about 30 % faster (one core: 24 s against
# 32-41 s) with the same losses. Subprocesses inherit XLA_FLAGS and append
# their device count (the last value of a flag wins).
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '')
  + ' --xla_cpu_use_fusion_emitters=false'
  + ' --xla_force_host_platform_device_count=8'
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The parity tests compare float32 results to ~1e-5. On a GPU, JAX's default
# float32 matmuls round their inputs to TF32 (10-bit mantissa; jax docs,
# "Matmul precision") and cuDNN convolutions in torch do too: pin full
# float32 for both (on a CPU this changes nothing). The environment reaches
# the CLI subprocesses as well.
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
os.environ.setdefault('NVIDIA_TF32_OVERRIDE', '0')
# The tests compile far more than they compute: XLA without most of its
# optimizations compiles the tiny models about 2x faster (flax's imagenet
# test does the same). Results stay float32-exact up to rounding.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', 'true')
# One persistent compilation cache for this test session, shared with the
# CLI subprocesses (which inherit the environment): a second run of the same
# config loads its executables instead of compiling them again.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='dino_jax_test_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402

jax.config.update('jax_threefry_partitionable', True)

from absl import flags  # noqa: E402

# absltest helpers and grain workers read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()
