"""Images/s of the full DINO train step, dino_jax vs PyTorch, in one run.

  python benchmarks/train_step.py --arch vit_small --batch 8
  python benchmarks/train_step.py --arch vit_base --batch 64 \
      --peak_tflops 989               # on a GPU: bf16 + fused attention (auto),
                                      # torch runs fp16 autocast
  python benchmarks/train_step.py --sweep devices   # scaling, JAX only

One "image" is 2 x 224^2 + L x 96^2 crops (L = 8 by default): the teacher on
the 2 global crops, the student forward and backward on all of them, AdamW
with per-tensor clipping, EMA and center update. ``--steps`` (3) steps of
each side are timed in turns after two warm-up steps; the median and the
minimum of each are reported (benchmarks/timing.py):

  jax_aug    dino_jax step with the on-device multi-crop inside jit, fed
             decoded uint8 canvases (what the training program runs);
  jax        dino_jax step fed ready crops;
  torch      a PyTorch DINO step of the same model fed ready crops
             (benchmarks/torch_step.py, written from SPEC; or the official
             vision_transformer.py with --official_repo=PATH).

``--dtype`` and ``--attention`` default to 'auto' as the ImageNet configs:
bfloat16 and fused attention on GPU/TPU, float32 and einsum on CPU (the
resolved values are in the row). Ratios are taken against torch in the same
run. ``gflops_per_image`` is the analytic matmul count of dino_jax/flops.py
(the same for every side); ``<side>_mfu`` divides it by the median step time
and --peak_tflops (the device's dense peak for the dtype used) times the
device count. ``<side>_xla_gflops_per_image`` is XLA's cost analysis of the
compiled step: exact on CPU, far too low on GPU (it misses cuBLAS/cuDNN
calls). ``<side>_xla_memory`` is XLA's memory plan per device (arguments,
temporaries, outputs less the donated aliases; ``--sweep batch`` gives it
per batch); ``jax_peak_bytes`` and ``torch_peak_bytes``
(``torch.cuda.max_memory_allocated``) are what the allocators saw, on
accelerators. Prints one JSON object per result and appends them to --out
when given.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import timing

ARCHS = {
  'vit_tiny': {'dim': 192, 'depth': 12, 'heads': 3},
  'vit_small': {'dim': 384, 'depth': 12, 'heads': 6},
  'vit_base': {'dim': 768, 'depth': 12, 'heads': 12},
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--arch', default='vit_small', choices=sorted(ARCHS))
  p.add_argument('--patch', type=int, default=16)
  p.add_argument('--batch', type=int, default=8, help='global batch')
  p.add_argument('--out_dim', type=int, default=65536)
  p.add_argument('--global_size', type=int, default=224)
  p.add_argument('--local_size', type=int, default=96)
  p.add_argument('--locals', type=int, default=8)
  p.add_argument('--canvas', type=int, default=512)
  p.add_argument(
    '--dtype', default='auto', choices=['auto', 'float32', 'bfloat16']
  )
  p.add_argument(
    '--attention', default='auto', choices=['auto', 'einsum', 'fused']
  )
  p.add_argument('--remat', action='store_true')
  p.add_argument('--steps', type=int, default=3, help='timed steps per side')
  p.add_argument(
    '--sides',
    default='jax_aug,jax,torch',
    help='comma list of jax_aug, jax, torch',
  )
  p.add_argument(
    '--torch_amp',
    default='auto',
    choices=['auto', 'on', 'off'],
    help='fp16 autocast; auto: on CUDA when the jax side is not float32',
  )
  p.add_argument('--official_repo', default=None)
  p.add_argument('--peak_tflops', type=float, default=0.0)
  p.add_argument(
    '--sweep',
    default=None,
    choices=['devices', 'locals', 'resolution', 'batch'],
    help='scaling sweep of the jax step (subprocess per point)',
  )
  p.add_argument(
    '--sweep_values',
    default=None,
    help='comma list of points for --sweep (default: see SWEEPS)',
  )
  p.add_argument('--out', default=None, help='append JSON lines here')
  return p.parse_args(argv)


def make_config(args):
  """The dino_jax config of the benchmarked step."""
  from dino_jax import config as config_lib

  c = config_lib.default_config()
  c.batch_size = args.batch
  c.model.arch = args.arch
  c.model.patch_size = args.patch
  c.model.out_dim = args.out_dim
  c.model.dtype = args.dtype
  c.model.attention = args.attention
  c.model.remat = args.remat
  c.crops.global_size = args.global_size
  c.crops.local_size = args.local_size
  c.crops.local_number = args.locals
  return c


def jax_steps(args):
  """{'jax': (run, xla_flops, xla_memory), 'jax_aug': ...} on all devices."""
  import jax
  import numpy as np

  from dino_jax import config as config_lib
  from dino_jax import parallel
  from dino_jax import step as step_lib
  from dino_jax.data import multicrop

  c = make_config(args)
  config_lib.validate(c, jax.device_count())
  mesh = parallel.make_mesh()
  sched = step_lib.Schedules.from_config(c, 1000)
  student, teacher = step_lib.build_models(c)
  tx = step_lib.build_optimizer(c, sched)
  init_fn = step_lib.init_fn_for(c, student, tx)  # c.seed = 0
  shape = jax.eval_shape(init_fn)
  shardings = parallel.state_sharding(mesh, shape, c.mesh.fsdp_min_size)
  rs = np.random.RandomState(0)
  out, memory = {}, {}
  sides = args.sides.split(',')
  for side in ('jax', 'jax_aug'):
    if side not in sides:
      continue
    if side == 'jax_aug':
      batch = {
        'image': rs.randint(
          0, 256, (args.batch, args.canvas, args.canvas, 3), np.uint8
        ),
        'size': np.tile(
          [[args.canvas * 3 // 4, args.canvas]], (args.batch, 1)
        ).astype(np.int32),
      }
      augment = multicrop.make_multicrop(c.crops)
    else:
      g, s = args.global_size, args.local_size
      batch = {
        'global_crops': rs.randn(2, args.batch, g, g, 3).astype(np.float32)
      }
      if args.locals:
        batch['local_crops'] = rs.randn(
          args.locals, args.batch, s, s, 3
        ).astype(np.float32)
      augment = None
    fn = step_lib.make_train_step(student, teacher, tx, sched, augment=augment)
    batch = jax.device_put(batch, parallel.tree_batch_sharding(mesh, batch))
    jitted = parallel.jit_train_step(fn, mesh, shardings, batch)
    state = jax.jit(init_fn, out_shardings=shardings)()
    compiled = jitted.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float((cost or {}).get('flops', 0.0))
    mem = compiled.memory_analysis()
    if mem is not None:  # XLA's plan per device: state + batch + temporaries
      memory[side] = plan_bytes(mem)
    holder = {'state': state}

    def run(jitted=jitted, holder=holder, batch=batch):
      holder['state'], metrics = jitted(holder['state'], batch)
      return float(metrics['loss'])  # waits for the step

    out[side] = (run, flops, memory.get(side))
  return out


def plan_bytes(mem) -> dict[str, int]:
  """XLA's memory plan of one device from ``compiled.memory_analysis()``.

  ``total_bytes`` = arguments + outputs + temporaries - aliases: the donated
  state's outputs reuse the argument buffers, so they count once.
  """
  out = {
    'arguments_bytes': int(mem.argument_size_in_bytes),
    'temp_bytes': int(mem.temp_size_in_bytes),
    'output_bytes': int(mem.output_size_in_bytes),
    'alias_bytes': int(mem.alias_size_in_bytes),
  }
  out['total_bytes'] = (
    out['arguments_bytes']
    + out['output_bytes']
    + out['temp_bytes']
    - out['alias_bytes']
  )
  return out


def torch_step(args, jax_dtype):
  import numpy as np
  import torch

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import torch_step as ts

  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  auto = device.type == 'cuda' and jax_dtype != 'float32'
  amp = {'on': True, 'off': False, 'auto': auto}[args.torch_amp]
  arch = {'name': args.arch, 'patch': args.patch, **ARCHS[args.arch]}
  student, teacher = ts.build(arch, args.out_dim, args.official_repo)
  step = ts.Step(student, teacher, args.out_dim, amp, device)
  rs = np.random.RandomState(0)
  g, s = args.global_size, args.local_size

  def crops(n, size):  # NCHW, one tensor per crop
    return [
      torch.from_numpy(rs.randn(args.batch, 3, size, size).astype(np.float32))
      .to(device)
      .contiguous()
      for _ in range(n)
    ]

  global_crops, local_crops = crops(2, g), crops(args.locals, s)

  def run():
    return float(step(global_crops, local_crops))  # .item() syncs

  return run, {'torch_amp': amp, 'torch_threads': torch.get_num_threads()}


def peak_memory():
  """Peak bytes per device (accelerators) or the process's max RSS (CPU)."""
  import jax

  out = {}
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['jax_peak_bytes'] = int(stats['peak_bytes_in_use'])
  try:
    import torch

    if torch.cuda.is_available():
      out['torch_peak_bytes'] = int(torch.cuda.max_memory_allocated())
  except ImportError:
    pass
  out['process_max_rss_bytes'] = (
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  )
  return out


def measure(args):
  import jax

  from dino_jax import config as config_lib
  from dino_jax import flops, hostmem

  config = make_config(args)
  dtype, attention = config_lib.resolve_compute(config.model)
  model_flops = flops.from_config(config)['step']
  runs, info = {}, {}
  xla_flops = {}
  for side, (fn, f, mem) in jax_steps(args).items():
    runs[side], xla_flops[side] = fn, f
    if mem:
      info[f'{side}_xla_memory'] = mem
  if 'torch' in args.sides.split(','):
    runs['torch'], extra = torch_step(args, dtype)
    info.update(extra)
  times = timing.interleaved(runs, args.steps)  # after 2 warm-up calls
  result = {
    'benchmark': 'train_step',
    'date': time.strftime('%Y-%m-%d'),
    'backend': jax.default_backend(),
    'device': jax.devices()[0].device_kind,
    'devices': jax.device_count(),
    'cpu': platform.processor() or platform.machine(),
    'arch': f'{args.arch}/{args.patch}',
    'batch': args.batch,
    'crops': f'2x{args.global_size} + {args.locals}x{args.local_size}',
    'out_dim': args.out_dim,
    'dtype': dtype,  # resolved from --dtype (auto: by backend)
    'attention': attention,
    'remat': args.remat,
    'malloc': hostmem.status(),  # dino_jax.hostmem
    **info,
  }
  result.update(timing.summarize(times, suffix='_step'))
  for side, ts in times.items():
    result[f'{side}_images_per_sec'] = round(
      args.batch / statistics.median(ts), 2
    )
  # Analytic matmul FLOPs, the same work for every side (dino_jax/flops.py).
  result['gflops_per_image'] = round(model_flops / args.batch / 1e9, 2)
  for side, f in xla_flops.items():
    if f:
      result[f'{side}_xla_gflops_per_image'] = round(f / args.batch / 1e9, 2)
  if args.peak_tflops:
    peak = args.peak_tflops * 1e12 * jax.device_count()
    for side, ts in times.items():
      mfu = model_flops / statistics.median(ts) / peak
      result[f'{side}_mfu'] = round(mfu, 4)
  if 'jax' in times and 'jax_aug' in times:
    extra = statistics.median(times['jax_aug']) - statistics.median(
      times['jax']
    )
    result['augment_fraction_of_step'] = round(
      max(extra, 0.0) / statistics.median(times['jax_aug']), 3
    )
  result.update(peak_memory())
  return result


SWEEPS = {
  'devices': (None, [1, 2, 4, 8]),  # fake CPU devices via XLA_FLAGS
  'locals': ('--locals', [0, 2, 4, 8]),
  'resolution': ('--global_size', [96, 160, 224]),
  'batch': ('--batch', [8, 16, 32, 64]),
}


def _without(argv, flags):
  """argv minus each flag in ``flags`` (``--f v`` or ``--f=v`` forms)."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in flags:
      skip = True
    elif not a.startswith(tuple(f + '=' for f in flags)):
      out.append(a)
  return out


def sweep(args, argv):
  """One subprocess per point (device counts need a fresh JAX; each point
  chooses its own malloc settings, ``dino_jax.hostmem``)."""
  flag, values = SWEEPS[args.sweep]
  if args.sweep_values:
    try:
      values = [int(v) for v in args.sweep_values.split(',')]
    except ValueError:
      raise SystemExit(
        f'--sweep_values={args.sweep_values!r}: expected integers, e.g. 4,8'
      ) from None
  # The parent writes --out; each point is one plain measurement.
  base = _without(argv, ('--sweep', '--sweep_values', '--out'))
  if '--sides' not in ' '.join(base):
    base += ['--sides', 'jax']
  rows = []
  for value in values:
    env = dict(os.environ)
    cmd = [sys.executable, os.path.abspath(__file__), *base]
    if flag is None:
      env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={value}'
      env['JAX_PLATFORMS'] = 'cpu'
    else:
      cmd += [flag, str(value)]
    print(f'sweep {args.sweep}={value} ...', file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
      print(proc.stderr[-2000:], file=sys.stderr)
      continue
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row['sweep'] = args.sweep
    rows.append(row)
  return rows


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  rows = sweep(args, argv) if args.sweep else [measure(args)]
  timing.emit(rows, args.out)


if __name__ == '__main__':
  sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )
  from dino_jax import hostmem

  hostmem.configure()  # both sides run with the same malloc settings
  main()
