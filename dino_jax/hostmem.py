"""Host memory allocator settings for XLA:CPU (glibc malloc).

XLA:CPU allocates each step's temporaries anew (2.7 GB for the ViT-S/16 DINO
step at batch 8) and frees them at the end. With glibc's defaults those
blocks come from mmap or from per-thread heaps that are unmapped when empty,
so every step page-faults all of them in again: a ViT-S block's forward and
backward took 37 000 minor faults and 0.12 s of kernel time per call here,
about a quarter of its wall time; PyTorch, whose tensors stay under glibc's
adaptive mmap threshold (up to 32 MB) and so are reused from the heap, took
none. Three settings keep freed memory in the process for reuse: one arena,
no mmap, no trimming. glibc reads them only when a process starts, so the
entry points (``python -m dino_jax.main``, the evaluation and benchmark
scripts) re-execute themselves once with them set, before any work. The
process then keeps its peak host memory until it exits.

Only for what was measured to gain and to stay flat: one CPU device in the
process, no accelerator. With 8 fake CPU devices
(``--xla_force_host_platform_device_count=8``) the single heap fragmented
until the ViT-T step ran out of 24 GB; with a GPU or TPU the step's
temporaries are in device memory anyway.

Set ``DINO_JAX_SYSTEM_MALLOC=1`` to keep the system's settings; values the
user already set for these variables are kept.
"""

import os
import platform
import re
import sys
from collections.abc import Mapping

SETTINGS = {
  'MALLOC_ARENA_MAX': '1',  # per-thread heaps are unmapped when empty
  'MALLOC_MMAP_MAX_': '0',  # large blocks would be mmap'd and unmapped
  'MALLOC_TRIM_THRESHOLD_': str(1 << 40),  # never give the heap top back
}
OPT_OUT = 'DINO_JAX_SYSTEM_MALLOC'
_GUARD = 'DINO_JAX_MALLOC_SET'


def _is_glibc() -> bool:
  return platform.libc_ver()[0] == 'glibc'


# Device files of GPUs (NVIDIA, AMD) and TPUs (v2-v4, v5+).
_ACCELERATOR_FILES = ('/dev/nvidia0', '/dev/kfd', '/dev/accel0', '/dev/vfio/0')


def _has_accelerator() -> bool:
  return any(os.path.exists(p) for p in _ACCELERATOR_FILES)


def _single_cpu_device(environ: Mapping[str, str], accelerator: bool) -> bool:
  """Whether JAX will run on exactly one CPU device."""
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms:
    if platforms.split(',')[0].strip() != 'cpu':
      return False
  elif accelerator:
    return False
  flags = environ.get('XLA_FLAGS', '')
  counts = re.findall(r'--xla_force_host_platform_device_count=(\d+)', flags)
  return not counts or int(counts[-1]) == 1


def tuned_environ(
  environ: Mapping[str, str],
  system: str,
  glibc: bool,
  accelerator: bool = False,
) -> dict[str, str] | None:
  """The environment to restart with, or None to run as is.

  Args:
    environ: the current environment.
    system: ``sys.platform``.
    glibc: whether the C library is glibc (the settings are glibc's).
    accelerator: whether a GPU or TPU device file exists.
  """
  if system != 'linux' or not glibc:
    return None
  if not _single_cpu_device(environ, accelerator):
    return None
  if environ.get(OPT_OUT, '') not in ('', '0') or environ.get(_GUARD):
    return None
  if all(key in environ for key in SETTINGS):
    return None
  env = dict(environ)
  for key, value in SETTINGS.items():
    env.setdefault(key, value)
  env[_GUARD] = '1'  # never restart twice
  return env


def without_settings(environ: Mapping[str, str]) -> dict[str, str]:
  """``environ`` minus the settings this module added (for a child process
  that should choose for itself, e.g. one with several CPU devices)."""
  env = dict(environ)
  if env.pop(_GUARD, None):
    for key, value in SETTINGS.items():
      if env.get(key) == value:
        del env[key]
  return env


def status() -> str:
  """'tuned', 'system', or 'custom' (some settings set by the user)."""
  if os.environ.get(_GUARD) and all(
    os.environ.get(k) == v for k, v in SETTINGS.items()
  ):
    return 'tuned'
  if any(k in os.environ for k in SETTINGS):
    return 'custom'
  return 'system'


def choose_platform(environ, accelerator: bool) -> None:
  """JAX_PLATFORMS=cpu where no GPU or TPU device file exists (if unset).

  With libtpu installed (the '.[tpu]' extra, for ``dino_jax.aot``), JAX
  probes for a TPU at start-up, and on a machine without one libtpu prints a
  screen of errors ("Failed to find host bounds", "No jellyfish device
  found"). Deciding the platform first leaves only the run's own lines.
  """
  if not accelerator and not environ.get('JAX_PLATFORMS'):
    environ['JAX_PLATFORMS'] = 'cpu'
    import jax  # imported already by most entry points: set it there too

    jax.config.update('jax_platforms', 'cpu')


def reexec_if_needed() -> None:
  """Restart this process with SETTINGS in its environment (once).

  Call first thing in a program's ``__main__``: everything done before is
  done again. Does nothing off glibc Linux, with several CPU devices or an
  accelerator, when opted out, or when already restarted.
  """
  choose_platform(os.environ, _has_accelerator())
  env = tuned_environ(os.environ, sys.platform, _is_glibc(), _has_accelerator())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
