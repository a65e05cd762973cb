"""The report: compiled for a target, as JSON and as the printed lines.

``run`` checks the config for the target, compiles the step (and the
evaluation's feature function, and the batch search where asked) and
returns the report, ``--out``'s JSON; ``format_report`` gives the lines the
CLI prints, ending with ``verdict``, and ``roofline`` the images per second
the chip's peak FLOP/s and HBM bandwidth allow.
"""

import math
import resource

import jax
import ml_collections

from dino_jax.aot.compile import compile_features, compile_step, memory
from dino_jax.aot.hlo import collectives, hlo_instructions, xla_cost
from dino_jax.aot.search import find_max_batch
from dino_jax.aot.targets import (
  GPU_MEMORY_FRACTION,
  AotError,
  Chip,
  GiB,
  Target,
  check_config,
  target_devices,
)


def roofline(
  chip: Chip,
  flops_per_image: float,
  bytes_per_image: float | None,
  mfu: float,
) -> dict:
  """Images/s per device: the lower of the compute and the memory bound.

  Args:
    chip: the chip (peak FLOP/s, HBM bandwidth).
    flops_per_image: FLOPs one image costs (the compute bound divides the
      peak at ``mfu`` by it).
    bytes_per_image: bytes of device memory one image reads and writes
      (XLA's 'bytes accessed'); None where unknown, and then only the
      compute bound is given.
    mfu: the fraction of the peak FLOP/s the compute bound assumes.

  Returns:
    ``compute`` (images/s at ``mfu``), ``memory`` (images/s with every byte
    at the full HBM bandwidth, or None), ``images_per_second`` (the lower)
    and ``bound`` ('compute' or 'memory').
  """
  compute = chip.peak_tflops * 1e12 * mfu / flops_per_image
  memory_bound = (
    chip.bandwidth_gbps * 1e9 / bytes_per_image if bytes_per_image else None
  )
  if memory_bound is not None and memory_bound < compute:
    return {
      'compute': compute,
      'memory': memory_bound,
      'images_per_second': memory_bound,
      'bound': 'memory',
    }
  return {
    'compute': compute,
    'memory': memory_bound,
    'images_per_second': compute,
    'bound': 'compute',
  }


def analyze(config, target: Target, mesh, mfu: float = 0.35) -> dict:
  """Compiles for ``target`` and returns the report (``--out``'s JSON)."""
  from dino_jax import config as config_lib
  from dino_jax import flops as flops_lib
  from dino_jax import parallel

  chip = target.chip
  n = target.num_devices
  dtype, attention = config_lib.resolve_compute(config.model, chip.platform)
  limit = chip.memory_gib * GiB
  if chip.platform == 'gpu':
    limit *= GPU_MEMORY_FRACTION
  report = {
    'topology': target.spec,
    'slices': target.slices,
    'chip': chip.name,
    'platform': chip.platform,
    'devices': n,
    'mesh': dict(mesh.shape),
    # Each device's slice, by mesh position ([data][fsdp]).
    'mesh_slices': [
      [parallel.slice_index(d) for d in row] for row in mesh.devices
    ],
    'batch_size': config.batch_size,
    'arch': config.model.arch,
    'patch_size': config.model.patch_size,
    'dtype': dtype,
    'attention': attention,
    'remat': bool(config.model.remat),
    'memory_limit_bytes': int(limit),
    'jax': jax.__version__,
  }
  if chip.platform == 'tpu':
    import importlib.metadata

    report['libtpu'] = importlib.metadata.version('libtpu')
  step_result = compile_step(config, mesh, chip.platform)
  report['compile_seconds'] = round(step_result.seconds, 1)
  analytic = flops_lib.from_config(config)
  report['flops_per_image'] = analytic['per_image']
  report['flops_per_device'] = analytic['step'] / n
  report['peak_tflops'] = chip.peak_tflops
  report['peak_source'] = chip.source
  report['mfu'] = mfu
  report['images_per_second_per_device'] = (
    chip.peak_tflops * 1e12 * report['mfu'] / analytic['per_image']
  )
  if step_result.exhausted:
    report['fits'] = False
    report['needed_bytes'] = step_result.needed
    report['error'] = step_result.error
  else:
    compiled = step_result.compiled
    report['memory'] = memory(compiled)
    report['fits'] = report['memory']['peak'] <= limit
    cost = xla_cost(compiled)
    xla, moved = cost['flops'], cost['bytes']
    per_image = n / config.batch_size
    report['xla_flops_per_device'] = xla
    report['xla_flops_per_image'] = xla * per_image if xla else None
    report['xla_bytes_per_device'] = moved
    report['xla_bytes_per_image'] = moved * per_image if moved else None
    # XLA's cost analysis counts a while loop's body once: with scanned
    # blocks its FLOPs and bytes hold one block of depth (docs/aot.md,
    # "Scanned blocks"), so they bound nothing.
    report['xla_counts_one_block'] = bool(config.model.get('scan_blocks'))
    hlo_text = compiled.as_text()
    report['collectives'] = collectives(hlo_text)
    report['hlo_instructions'] = hlo_instructions(hlo_text)
  report['bandwidth_gbps'] = chip.bandwidth_gbps
  report['bandwidth_source'] = chip.bandwidth_source
  report['roofline'] = roofline(
    chip,
    analytic['per_image'],
    None
    if report.get('xla_counts_one_block')
    else report.get('xla_bytes_per_image'),
    mfu,
  )
  return report


def _gib(x: float) -> str:
  return f'{x / GiB:.2f}'


def verdict(report: dict) -> str:
  """The one-line answer: 'fits (X of Y GiB)' or 'does not fit: ...'."""
  limit = report['memory_limit_bytes']
  what = 'per device'
  if report['fits']:
    return (
      f'fits ({_gib(report["memory"]["peak"])} of {_gib(limit)} GiB {what})'
    )
  step_memory = report.get('memory', {})
  features = report.get('features', {})
  if step_memory and step_memory['peak'] <= limit and features:
    peak = features.get('memory', {}).get('peak') or features.get(
      'needed_bytes'
    )
    needs = f'needs {_gib(peak)} GiB of {_gib(limit)}' if peak else ''
    return (
      f"does not fit: the evaluation's feature function {needs} {what}; "
      'try a smaller eval.batch_size'
    )
  need = report.get('needed_bytes') or step_memory.get('peak')
  needs = (
    f'needs {_gib(need)} GiB of {_gib(limit)}'
    if need
    else (f'exceeds {_gib(limit)} GiB')
  )
  hints = []
  fsdp = report['mesh'].get('fsdp', 1)
  per_slice = report['devices'] // report['slices']
  if fsdp < per_slice:
    bigger = next(
      (f for f in (2, 4, 8, 16, 32, 64) if f > fsdp and per_slice % f == 0),
      None,
    )
    if bigger:
      hints.append(f'mesh.fsdp={bigger}')
  if not report['remat']:
    hints.append('model.remat=True')
  hints.append('a smaller batch')
  return f'does not fit: {needs} {what}; try {", ".join(hints)}'


def format_report(report: dict) -> str:
  """The report as the lines the CLI prints."""
  mesh = ' x '.join(f'{k} {v}' for k, v in report['mesh'].items())
  lines = [
    f'target: {report["topology"]}'
    + (f' x {report["slices"]} slices' if report['slices'] > 1 else '')
    + f', {report["devices"]} x {report["chip"]}; mesh {mesh}',
    'model: '
    + (
      f'{report["arch"]}, {report["dtype"]}'  # a ResNet: no patches
      if report['arch'].startswith('resnet')
      else f'{report["arch"]}/{report["patch_size"]}, {report["dtype"]}, '
      f'{report["attention"]} attention'
    )
    + f', remat {report["remat"]}; global batch {report["batch_size"]}',
    f'train step compiled in {report["compile_seconds"]:.0f} s'
    + (
      f', {report["hlo_instructions"]:,} HLO instructions (optimized)'
      if report.get('hlo_instructions')
      else ''
    ),
  ]
  if 'memory' in report:
    m = report['memory']
    lines.append(
      f'memory per device: arguments {_gib(m["arguments"])}, outputs '
      f'{_gib(m["outputs"])} ({_gib(m["aliased"])} reuse donated '
      f'arguments), temporaries {_gib(m["temporaries"])}, code '
      f'{_gib(m["code"])}; peak {_gib(m["peak"])} GiB of '
      f'{_gib(report["memory_limit_bytes"])}'
    )
  elif report.get('error'):
    lines.append(f'compiler: {report["error"][:300]}')
  per_image = report['flops_per_image']
  flop_line = (
    f'FLOPs: {per_image / 1e9:.4g} GFLOPs per image, '
    f'{report["flops_per_device"] / 1e12:.4g} TFLOPs per device per step '
    '(analytic, dino_jax/flops.py)'
  )
  if report.get('xla_flops_per_device'):
    flop_line += (
      f'; XLA: {report["xla_flops_per_image"] / 1e9:.4g} GFLOPs per image, '
      f'{report["xla_flops_per_device"] / 1e12:.4g} TFLOPs per device'
    )
  elif 'memory' in report:
    flop_line += '; XLA counts none here'
  if report.get('xla_counts_one_block'):
    flop_line += (
      ' (scanned blocks: XLA counts the loop body, one block, once; its '
      "FLOPs and bytes are not the step's)"
    )
  lines.append(flop_line)
  if report.get('xla_bytes_per_device'):
    moved = report['xla_bytes_per_image']
    line = (
      f'bytes accessed (XLA): {moved / 1e9:.4g} GB per image, '
      f'{report["xla_bytes_per_device"] / 1e9:.4g} GB per device per step'
    )
    if report.get('xla_flops_per_device'):
      intensity = (
        report['xla_flops_per_device'] / report['xla_bytes_per_device']
      )
      ridge = report['peak_tflops'] * 1e3 / report['bandwidth_gbps']
      line += (
        f'; {intensity:.3g} FLOPs per byte (compute-bound above '
        f'{ridge:.0f} on this chip)'
      )
    if report.get('platform') == 'gpu':
      line += (
        "; XLA:GPU leaves out its cuBLAS/cuDNN calls' bytes, so the memory "
        'bound below is an upper bound'
      )
    lines.append(line)
  elif 'memory' in report:
    lines.append('bytes accessed: XLA counts none here')
  lines.extend(roofline_lines(report))
  if report.get('collectives'):
    parts = [
      f'{op} {c["count"]} ({c["bytes"] / 2**20:.1f} MiB)'
      for op, c in sorted(report['collectives'].items())
    ]
    lines.append(
      'collectives per step, result bytes per device: ' + ', '.join(parts)
    )
  elif 'memory' in report:
    lines.append('collectives: none')
  if 'features' in report:
    f = report['features']
    if 'memory' in f:
      lines.append(
        f'evaluation features (batch {f["batch_size"]}): peak '
        f'{_gib(f["memory"]["peak"])} GiB per device, compiled in '
        f'{f["compile_seconds"]:.0f} s'
      )
    else:
      lines.append(
        f'evaluation features (batch {f["batch_size"]}): does not fit'
      )
  if 'max_batch' in report:
    lines.append(
      f'largest global batch that fits: {report["max_batch"]} '
      f'({len(report["max_batch_probes"])} compiles)'
    )
  lines.append(f'host: peak {report["host_peak_bytes"] / GiB:.1f} GiB resident')
  lines.append(verdict(report))
  return '\n'.join(lines)


def roofline_lines(report: dict) -> list[str]:
  """The roofline's lines: the compute bound, the memory bound, the lower."""
  r = report.get('roofline') or {
    'compute': report['images_per_second_per_device'],
    'memory': None,
    'images_per_second': report['images_per_second_per_device'],
    'bound': 'compute',
  }
  n = report['devices']
  lines = [
    f'compute bound: {r["compute"]:.0f} images/s per device at '
    f'{report["mfu"]:.0%} MFU of {report["peak_tflops"]:.0f} TFLOP/s bf16 '
    f'per chip ({report["peak_source"]})'
  ]
  if r['memory'] is not None:
    lines.append(
      f'memory bound: {r["memory"]:.0f} images/s per device at '
      f'{report["bandwidth_gbps"]:.0f} GB/s HBM per chip '
      f'({report["bandwidth_source"]})'
    )
  lines.append(
    f'roofline: {r["images_per_second"]:.0f} images/s per device '
    f'({r["images_per_second"] * n:.0f} in all), {r["bound"]}-bound'
    + ('' if r['memory'] is not None else ' (no byte count: compute only)')
  )
  return lines


def host_peak_bytes() -> int:
  """This process's peak resident memory (Linux reports kilobytes)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(
  config: ml_collections.ConfigDict,
  target: Target,
  *,
  mfu: float = 0.35,
  eval_features: bool = True,
  max_batch: bool = False,
  max_batch_step: int = 0,
) -> dict:
  """Compiles for ``target``; the report (``format_report`` prints it).

  Args:
    config: the training config.
    target: ``parse_topology``'s target.
    mfu: the MFU of the roofline estimate.
    eval_features: also compile the k-NN feature function.
    max_batch: also find the largest global batch that fits.
    max_batch_step: its resolution in images (0: the device count).

  Raises:
    AotError: an unusable target, mesh or config.
  """
  from dino_jax import parallel

  # Checked before libtpu or the CUDA plugin starts, and before minutes
  # of compiling: the target's device count is known from its shape.
  check_config(config, target, target.num_devices)
  devices = target_devices(target)
  if len(devices) != target.num_devices:
    check_config(config, target, len(devices))
  try:
    mesh = parallel.make_mesh(
      config.mesh.data, config.mesh.fsdp, devices=devices
    )
  except ValueError as e:
    raise AotError(f'{target.spec}: {e}') from e
  report = analyze(config, target, mesh, mfu)
  if eval_features and report['fits']:
    result = compile_features(config, mesh, target.chip.platform)
    f = {
      'batch_size': config.eval.batch_size,
      'compile_seconds': round(result.seconds, 1),
    }
    if not result.exhausted:
      f['memory'] = memory(result.compiled)
      fits_eval = f['memory']['peak'] <= report['memory_limit_bytes']
    else:
      f['needed_bytes'] = result.needed
      fits_eval = False
    report['features'] = f
    report['fits'] = report['fits'] and fits_eval
  if max_batch:
    step = max_batch_step or target.num_devices
    step = math.lcm(step, target.num_devices)
    peak = report.get('memory', {}).get('peak') or report.get('needed_bytes')
    known = {
      config.batch_size: (
        'memory' in report
        and report['memory']['peak'] <= report['memory_limit_bytes'],
        peak,
        report['compile_seconds'],
        report.get('xla_flops_per_device'),
      )
    }
    m = report.get('memory')
    fixed = m['arguments'] + m['outputs'] - m['aliased'] if m else None
    print('searching the largest global batch that fits:', flush=True)
    best, probes = find_max_batch(
      config,
      mesh,
      target.chip.platform,
      report['memory_limit_bytes'],
      step,
      known,
      fixed,
    )
    report['max_batch'] = best
    report['max_batch_probes'] = {
      str(b): {
        'fits': p[0],
        'peak_bytes': p[1],
        'compile_seconds': p[2],
        'xla_flops_per_image': p[3] * target.num_devices / b if p[3] else None,
      }
      for b, p in sorted(probes.items())
    }
  report['host_peak_bytes'] = host_peak_bytes()
  return report
