"""The targets: chips, topologies, and their compile-only devices.

A ``--topology`` names a chip generation and a shape (``parse_topology``);
``target_devices`` describes its devices without the hardware: libtpu
describes a TPU topology's chips, the CUDA PJRT plugin a GPU node from a
``GpuTargetConfigProto`` (``GPU_TARGETS``). ``CHIPS`` holds what the verdict
and the roofline need of each chip (memory, peak FLOP/s, HBM bandwidth).
"""

import dataclasses
import importlib
import math
import os
import re

import jax
import ml_collections

GiB = 2**30


class AotError(Exception):
  """A target or mesh this tool cannot compile for; one line for the user."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip as the verdict and the roofline see it.

  Attributes:
    name: the chip, as its maker names it.
    platform: 'tpu' or 'gpu' (``config.resolve_compute``'s backend).
    memory_gib: device memory a program may use. TPU: the HBM libtpu's
      compiler allows (its RESOURCE_EXHAUSTED message: "Used X of Y hbm");
      GPU: the memory XLA's GPU description gives (``device_memory_size``),
      before the allocator's fraction.
    peak_tflops: dense bf16 matmul peak per chip, TFLOP/s.
    source: where ``peak_tflops`` comes from.
    bandwidth_gbps: peak HBM bandwidth per chip, GB/s (10^9 bytes).
    bandwidth_source: where ``bandwidth_gbps`` comes from.
  """

  name: str
  platform: str
  memory_gib: float
  peak_tflops: float
  source: str
  bandwidth_gbps: float
  bandwidth_source: str

  @property
  def ridge(self) -> float:
    """FLOPs per byte above which a program is compute-bound on the chip."""
    return self.peak_tflops * 1e12 / (self.bandwidth_gbps * 1e9)


# Dense bf16 peaks (without 2:4 sparsity) and HBM bandwidths from the
# makers' pages; TPU v4 and v5p count one chip (two TensorCores as one
# megacore device). The GPUs' bandwidths are also GPU_TARGETS'
# ``memory_bandwidth`` (XLA's descriptions of them).
CHIPS = {
  'v4': Chip(
    'TPU v4',
    'tpu',
    30.75,
    275.0,
    'https://cloud.google.com/tpu/docs/v4',
    1200.0,
    'https://cloud.google.com/tpu/docs/v4',
  ),
  'v5e': Chip(
    'TPU v5e',
    'tpu',
    15.75,
    197.0,
    'https://cloud.google.com/tpu/docs/v5e',
    819.0,
    'https://cloud.google.com/tpu/docs/v5e',
  ),
  'v5p': Chip(
    'TPU v5p',
    'tpu',
    95.74,
    459.0,
    'https://cloud.google.com/tpu/docs/v5p',
    2765.0,
    'https://cloud.google.com/tpu/docs/v5p',
  ),
  'v6e': Chip(
    'TPU v6e',
    'tpu',
    31.25,
    918.0,
    'https://cloud.google.com/tpu/docs/v6e',
    1640.0,
    'https://cloud.google.com/tpu/docs/v6e',
  ),
  'a100': Chip(
    'NVIDIA A100-SXM4-80GB',
    'gpu',
    85100068864 / GiB,
    312.0,
    'NVIDIA A100 datasheet, SXM',
    2039.0,
    'NVIDIA A100 datasheet, SXM 80GB',
  ),
  'h100': Chip(
    'NVIDIA H100 80GB HBM3',
    'gpu',
    84942979072 / GiB,
    989.0,
    'NVIDIA H100 datasheet, SXM (1979 with sparsity)',
    3350.0,
    'NVIDIA H100 datasheet, SXM',
  ),
  'h200': Chip(
    'NVIDIA H200 141GB HBM3e',
    'gpu',
    151397597184 / GiB,
    989.0,
    'NVIDIA H200 datasheet, SXM (1979 with sparsity)',
    4800.0,
    'NVIDIA H200 datasheet, SXM',
  ),
}

# The fraction of a GPU's memory JAX's allocator reserves by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION; jax docs, "GPU memory allocation").
GPU_MEMORY_FRACTION = 0.75

# GpuTargetConfigProto fields per GPU (stream_executor
# device_description.proto). Values from XLA's own descriptions of these
# GPUs, xla/backends/gpu/target_config/specs/{a100_sxm_80,h100_sxm,h200}.txtpb
# (openxla/xla), which record what the CUDA driver reports; the fields below
# are the ones XLA's GPU compiler reads when it plans kernels and memory.
GPU_TARGETS = {
  'a100': {
    'name': 'NVIDIA A100-SXM4-80GB',
    'compute_capability': (8, 0, 'NONE'),
    'core_count': 108,
    'fpus_per_core': 64,
    'shared_memory_per_core': 167936,
    'shared_memory_per_block_optin': 166912,
    'memory_bandwidth': 2039040000000,
    'l2_cache_size': 41943040,
    'clock_rate_ghz': 1.41,
    'device_memory_size': 85100068864,
    'dnn_version': (8, 9, 4),
  },
  'h100': {
    'name': 'NVIDIA H100 80GB HBM3',
    'compute_capability': (9, 0, 'ACCELERATED_FEATURES'),
    'core_count': 132,
    'fpus_per_core': 128,
    'shared_memory_per_core': 233472,
    'shared_memory_per_block_optin': 232448,
    'memory_bandwidth': 3352320000000,
    'l2_cache_size': 52428800,
    'clock_rate_ghz': 1.98,
    'device_memory_size': 84942979072,
    'dnn_version': (9, 10, 0),
  },
  'h200': {
    'name': 'NVIDIA H200 141GB HBM3e',
    'compute_capability': (9, 0, 'ACCELERATED_FEATURES'),
    'core_count': 132,
    'fpus_per_core': 128,
    'shared_memory_per_core': 233472,
    'shared_memory_per_block_optin': 232448,
    'memory_bandwidth': 4800000000000,
    'l2_cache_size': 52428800,
    'clock_rate_ghz': 1.98,
    'device_memory_size': 151397597184,
    'dnn_version': (9, 10, 0),
  },
}


def gpu_target_config(gen: str) -> str:
  """The ``GpuTargetConfigProto`` text for GPU ``gen`` (``GPU_TARGETS``)."""
  t = GPU_TARGETS[gen]
  major, minor, feature = t['compute_capability']
  dnn = t['dnn_version']
  limits = {  # the same on every NVIDIA GPU since Volta (CUDA guide, H.1)
    'threads_per_block_limit': 1024,
    'threads_per_warp': 32,
    'shared_memory_per_block': 49152,
    'threads_per_core_limit': 2048,
    'block_dim_limit_x': 2147483647,
    'block_dim_limit_y': 65535,
    'block_dim_limit_z': 65535,
    'registers_per_core_limit': 65536,
    'registers_per_block_limit': 65536,
    'thread_dim_limit_x': 1024,
    'thread_dim_limit_y': 1024,
    'thread_dim_limit_z': 64,
  }
  fields = {
    **limits,
    **{
      k: t[k]
      for k in (
        'core_count',
        'fpus_per_core',
        'shared_memory_per_core',
        'shared_memory_per_block_optin',
        'memory_bandwidth',
        'l2_cache_size',
        'clock_rate_ghz',
        'device_memory_size',
      )
    },
  }
  lines = ['gpu_device_info {']
  lines += [f'  {k}: {v}' for k, v in fields.items()]
  lines += [
    '  cuda_compute_capability {',
    f'    major: {major}',
    f'    minor: {minor}',
    f'    feature_extension: {feature}',
    '  }',
    f'  dnn_version: "{".".join(map(str, dnn))}"',
    f'  name: "{t["name"]}"',
    '}',
    'platform_name: "CUDA"',
    f'dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} patch: {dnn[2]} }}',
    f'device_description_str: "{t["name"]}"',
  ]
  return '\n'.join(lines) + '\n'


@dataclasses.dataclass(frozen=True)
class Target:
  """A parsed ``--topology``: the chip and how many, in which shape."""

  spec: str
  gen: str
  shape: tuple[int, ...]
  slices: int

  @property
  def chip(self) -> Chip:
    return CHIPS[self.gen]

  @property
  def num_devices(self) -> int:
    return math.prod(self.shape) * self.slices


def parse_topology(spec: str, slices: int = 1) -> Target:
  """``'v5e:4x8'`` -> Target; AotError naming the valid forms otherwise."""
  usage = (
    f'unknown topology {spec!r}; use GEN:SHAPE with a TPU GEN in '
    f'{", ".join(g for g in CHIPS if CHIPS[g].platform == "tpu")} (e.g. '
    'v5e:4x8, v4:2x2x2) or GEN:COUNT with a GPU GEN in '
    f'{", ".join(g for g in CHIPS if CHIPS[g].platform == "gpu")} (e.g. '
    'h100:8, or h100:2x8 for two hosts)'
  )
  match = re.fullmatch(r'([a-z0-9]+)[:=]([0-9]+(?:x[0-9]+)*)', spec or '')
  if not match or match.group(1) not in CHIPS:
    raise AotError(usage)
  gen = match.group(1)
  shape = tuple(int(x) for x in match.group(2).split('x'))
  if min(shape) < 1:
    raise AotError(usage)
  if slices < 1:
    raise AotError(f'--slices={slices}; use 1 or more')
  if CHIPS[gen].platform == 'gpu' and (len(shape) > 2 or slices != 1):
    raise AotError(
      f'topology {spec!r}: a GPU target is GEN:GPUS or GEN:HOSTSxGPUS '
      '(e.g. h100:8), without --slices'
    )
  return Target(spec, gen, shape, slices)


def _libtpu_quiet_environment() -> None:
  """Tells libtpu it is not on a TPU VM, so it skips the metadata server.

  Without these libtpu prints a screen of warnings (no accelerator type, no
  worker hostnames) before it builds a compile-only topology. Set only where
  unset, in this compile-only process (which never initializes JAX's
  distributed runtime).
  """
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  # libtpu takes /tmp/libtpu_lockfile for one process per TPU VM; a compile
  # uses no chip, so several may run at once (tests, a sweep beside a run).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-4')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')


def libtpu_installed() -> bool:
  """Whether JAX finds libtpu where it looks for it: the file named by
  ``TPU_LIBRARY_PATH``, else the ``libtpu`` package if it imports (the
  order of jax's private ``xla_bridge.get_tpu_library_path``, asked here
  without it)."""
  path = os.environ.get('TPU_LIBRARY_PATH')
  if path and os.path.isfile(path):
    return True
  try:
    importlib.import_module('libtpu')
  except ImportError:
    return False
  return True


def target_devices(target: Target) -> list:
  """The target's compile-only devices (no hardware needed)."""
  from jax.experimental import topologies

  if target.chip.platform == 'tpu':
    if not libtpu_installed():
      raise AotError(
        f'compiling for {target.chip.name} needs libtpu: '
        "pip install -e '.[tpu]'"
      )
    _libtpu_quiet_environment()
    kwargs = {'num_slices': target.slices} if target.slices > 1 else {}
    if target.gen == 'v4':
      # One device per chip (its two TensorCores as one), as Cloud TPU v4
      # VMs present them.
      kwargs['chip_config_name'] = 'megacore'
    name = f'{target.gen}:{"x".join(map(str, target.shape))}'
    try:
      return topologies.get_topology_desc(
        topology_name=name, platform='tpu', **kwargs
      ).devices
    except jax.errors.JaxRuntimeError as e:
      raise AotError(
        f'topology {target.spec!r} rejected by libtpu: {first_line(e)}'
      ) from e
  try:
    import jax_plugins.xla_cuda12  # noqa: F401
  except ImportError as e:
    raise AotError(
      f'compiling for {target.chip.name} needs the CUDA plugin: '
      "pip install -e '.[aot-gpu]'"
    ) from e
  _gpu_compile_flags()
  hosts, gpus = (1, *target.shape) if len(target.shape) == 1 else target.shape
  return topologies.get_topology_desc(
    platform='cuda',
    target_config=gpu_target_config(target.gen),
    topology=f'1x{hosts}x{gpus}',
  ).devices


# Without a device XLA:GPU cannot autotune, and on jax 0.10.2 its Triton
# GEMM tiling then fails on the step's small matmuls ("Couldn't find output
# tile sizes that satisfy hlo: ... dot"); with Triton GEMMs off those run
# as cuBLAS calls, as XLA:GPU chooses for most large matmuls anyway.
GPU_XLA_FLAGS = ('--xla_gpu_enable_triton_gemm=false',)


def _gpu_compile_flags() -> None:
  """Adds GPU_XLA_FLAGS to XLA_FLAGS (read when the CUDA plugin starts);
  a value the user set for the same flag is kept."""
  current = os.environ.get('XLA_FLAGS', '')
  for flag in GPU_XLA_FLAGS:
    if flag.split('=')[0] not in current:
      current = f'{current} {flag}'.strip()
  os.environ['XLA_FLAGS'] = current


def first_line(error: BaseException) -> str:
  """The first non-blank line of an error's message (its type if none)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def check_config(
  config: ml_collections.ConfigDict,
  target: Target,
  num_devices: int,
) -> None:
  """``config.validate`` for ``num_devices`` (as training checks it; this
  includes the feature function's ``eval.batch_size``), as an AotError of
  one line naming the value to change."""
  from dino_jax import config as config_lib

  prefix = f'{target.spec} ({num_devices} devices)'
  try:
    config_lib.validate(config, num_devices)
  except config_lib.ConfigError as e:
    raise AotError(f'{prefix}: {e}') from e
