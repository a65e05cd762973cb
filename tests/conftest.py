"""Test setup: 8 fake CPU devices, set before JAX starts."""

import atexit
import gc
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
# gcsfs reads this once, at import: without it every gcsfs call of the gs://
# tests (the ``gcs`` fixture) first stalls about 60 s on a gRPC probe.
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
# One persistent compilation cache for this test session, shared with the
# CLI subprocesses (which inherit the environment): a second run of the same
# config loads its executables instead of compiling them again.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='dino_jax_test_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# absltest helpers and grain workers read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
  """A fake GCS server on 127.0.0.1 (``tests/gcs_server.py``), and this
  process's clients sent to it; yields the ``gcs_server.Server``.

  One per test session (per xdist worker): gcsfs caches its clients. Its
  log is in the session's temporary folder; it is stopped by its pid.
  """
  import gcs_server

  server = gcs_server.Server(str(tmp_path_factory.mktemp('gcs') / 'log'))
  variables = server.env()
  saved = {name: os.environ.get(name) for name in variables}
  os.environ.update(variables)
  try:
    yield server
  finally:
    # tensorboardX's GCS writers upload again when collected, at exit at
    # the latest (it keeps them referenced): without a server each retries
    # for 120 s. Their data was uploaded when they were closed.
    from tensorboardX import record_writer

    for obj in gc.get_objects():
      if type(obj) is record_writer.GCSRecordWriter:
        obj.close = lambda: None
    server.stop()
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
