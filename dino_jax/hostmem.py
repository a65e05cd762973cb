"""Host memory allocator settings for XLA:CPU (glibc malloc).

XLA:CPU allocates each step's temporaries anew (2.7 GB for the ViT-S/16 DINO
step at batch 8) and frees them at the end. With glibc's defaults those
blocks come from mmap or from per-thread heaps that are unmapped when empty,
so every step page-faults all of them in again: a ViT-S block's forward and
backward took 37 000 minor faults and 0.12 s of kernel time per call here,
about a quarter of its wall time; PyTorch, whose tensors stay under glibc's
adaptive mmap threshold (up to 32 MB) and so are reused from the heap, took
none. Three settings keep freed memory in the process for reuse: one arena,
no mmap, no trimming. ``configure`` makes them with glibc's ``mallopt``
(documented, ``man 3 mallopt``), in this process, before JAX computes
anything: the entry points (``python -m dino_jax.main``, the evaluation and
benchmark scripts) call it first thing. Set later (after XLA's threads
have allocated) they do not take. The process then keeps its peak host
memory until it exits.

Only for what was measured to gain and to stay flat: one CPU device in the
process, no accelerator. With 8 fake CPU devices
(``--xla_force_host_platform_device_count=8``) the single heap fragmented
until the ViT-T step ran out of 24 GB; with a GPU or TPU the step's
temporaries are in device memory anyway.

Set ``DINO_JAX_SYSTEM_MALLOC=1`` to keep the system's settings; a program
started with glibc's own variables for them (``MALLOC_ARENA_MAX``,
``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``) keeps
those.
"""

import ctypes
import os
import platform
import re
import sys
from collections.abc import Mapping

# mallopt parameters (glibc's malloc.h) and their values here.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = {
  M_ARENA_MAX: 1,  # per-thread heaps are unmapped when empty
  M_MMAP_MAX: 0,  # large blocks would be mmap'd and unmapped
  M_TRIM_THRESHOLD: -1,  # -1: never give the heap top back
}
# glibc's environment variables for the same settings: the user's choice.
VARIABLES = (
  'MALLOC_ARENA_MAX',
  'MALLOC_MMAP_MAX_',
  'MALLOC_TRIM_THRESHOLD_',
  'GLIBC_TUNABLES',
)
OPT_OUT = 'DINO_JAX_SYSTEM_MALLOC'

_status = 'system'  # what configure did in this process


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


def choice(
  environ: Mapping[str, str],
  system: str,
  glibc: bool,
  accelerator: bool = False,
) -> str:
  """'tuned' (make the settings), 'custom' (the user's) or 'system'.

  Args:
    environ: the process's environment.
    system: ``sys.platform``.
    glibc: whether the C library is glibc (the settings are glibc's).
    accelerator: whether a GPU or TPU device file exists.
  """
  if system != 'linux' or not glibc:
    return 'system'
  if not _single_cpu_device(environ, accelerator):
    return 'system'
  if environ.get(OPT_OUT, '') not in ('', '0'):
    return 'system'
  if any(key in environ for key in VARIABLES):
    return 'custom'
  return 'tuned'


def status() -> str:
  """What ``configure`` chose in this process: 'tuned', 'custom' (glibc's
  variables set by the user) or 'system' (glibc's defaults)."""
  return _status


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


def configure() -> str:
  """Chooses the platform, then makes SETTINGS here if they apply.

  Call first thing in a program's ``__main__``, before JAX computes
  anything. Does nothing off glibc Linux, with several CPU devices or an
  accelerator, when opted out, or when glibc's variables are set. Returns
  ``status()``.
  """
  global _status
  accelerator = _has_accelerator()
  choose_platform(os.environ, accelerator)
  chosen = choice(os.environ, sys.platform, _is_glibc(), accelerator)
  if chosen == 'tuned' and _status != 'tuned':
    libc = ctypes.CDLL(None)
    for param, value in SETTINGS.items():
      if libc.mallopt(param, value) != 1:  # 1: success
        chosen = 'system'
        break
  _status = chosen
  return _status
