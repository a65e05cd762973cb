"""JAX's persistent compilation cache for a run, so a restart does not
compile again.

``python -m dino_jax.main --workdir=DIR`` keeps the compiled executables in
``DIR/compilation_cache`` (local or ``gs://``, as the workdir), or in the
path ``--compilation_cache`` gives (``none``: no cache). A run restarted
after preemption, or resumed on the same hardware, loads its step from
there instead of compiling it again (minutes for a TPU pod's step: "Where
a TPU compile's time goes", docs/aot.md). The cache is keyed on the
program, the devices and the compiler version (jax docs, "Persistent
compilation cache"), so a changed config, topology or jax simply misses.
"""

import jax

from dino_jax import storage

OFF = 'none'


def cache_path(flag: str, workdir: str) -> str | None:
  """The cache directory for ``--compilation_cache=flag`` in ``workdir``.

  Args:
    flag: '' (the default: ``workdir/compilation_cache``, or the directory
      ``JAX_COMPILATION_CACHE_DIR`` names where it is set), ``'none'`` (no
      cache), or a local or ``gs://`` path.
    workdir: the run's workdir.

  Returns:
    The directory, or None for no cache.
  """
  if flag == OFF:
    return None
  if flag:
    return flag
  # JAX reads JAX_COMPILATION_CACHE_DIR at import: one cache shared by
  # several runs (the test suite's) is kept.
  return jax.config.jax_compilation_cache_dir or storage.join(
    workdir, 'compilation_cache'
  )


def enable(path: str | None) -> None:
  """Points JAX's persistent cache at ``path`` (None: turns it off).

  Call before the first compile: JAX opens the cache once per process.
  Programs that compile in under a second (jax's default threshold) are
  not written.
  """
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_enable_compilation_cache', path is not None)
