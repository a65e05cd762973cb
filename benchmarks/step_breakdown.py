"""FLOPs and bytes of each part of the train step, compiled for a target.

  python benchmarks/step_breakdown.py --config=configs/vit_s16.py \
      --topology=v5e:2x2 --config.batch_size=256 [--out=parts.json]

Compiles the parts of ``step.make_train_step`` separately, each as its own
jitted program on the target's mesh with the training program's shardings
(``dino_jax.aot``'s targets: TPU through libtpu, GPU through the CUDA
plugin, on this machine's CPU), and prints XLA's cost analysis of each:

  augmentation      the on-device multi-crop (canvases -> crops);
  student global    the student backbone forward + backward on the global
                    crops (drop path on; the head excluded);
  student local     the same on the local crops;
  teacher forward   backbone + head on the global crops;
  head + loss       the student head forward + backward on the backbones'
                    features, the DINO loss and the center update;
  optimizer + EMA   the optimizer update on the gradients and the teacher's
                    EMA.

and the whole step (``step.build_sharded_step``, what ``train.py`` runs)
beside their sum. Per part: XLA's FLOPs and 'bytes accessed' per image
(per device x devices / batch), their ratio (FLOPs per byte) and the share
of the step's bytes, so the largest consumer of memory traffic is known
before anything is changed (issue 40). The parts' sum differs from the
whole by what the compiler fuses across their boundaries (the boundary
tensors are written and read again here) and by the metrics. XLA:GPU does
not count its cuBLAS/cuDNN calls. The last line is the table as JSON.
ViT backbones only.
"""

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dino_jax import aot  # noqa: E402
from dino_jax.aot import __main__ as aot_cli  # noqa: E402 - its flags

PARTS = (
  'augmentation',
  'student global',
  'student local',
  'teacher forward',
  'head + loss',
  'optimizer + EMA',
)


def _abstract(tree, shardings):
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    tree,
    shardings,
  )


def _rows(crops):
  """[V, B, S, S, C] -> [B * V, S, S, C], as ``MultiCropModel`` runs them."""
  from dino_jax import parallel

  rows = jnp.swapaxes(crops, 0, 1).reshape(-1, *crops.shape[2:])
  return parallel.constrain_batch(rows)


def part_programs(config, mesh, platform: str) -> dict:
  """Each part as ``(jitted function, abstract arguments)``, on ``mesh``.

  The arguments carry the training program's shardings: the state as
  ``parallel.state_sharding`` splits it, crops and batch rows split over
  every device along the batch.
  """
  from dino_jax import config as config_lib
  from dino_jax import loss as loss_lib
  from dino_jax import parallel
  from dino_jax import step as step_lib
  from dino_jax.data import multicrop
  from dino_jax.models import RESNET_ARCHS

  if config.model.arch in RESNET_ARCHS:
    raise aot.AotError(
      f'model.arch={config.model.arch!r}: the breakdown splits ViT steps '
      'only; use a vit_* arch'
    )
  built = step_lib.build_sharded_step(
    config, mesh, aot.steps_per_epoch(config), backend=platform
  )
  student, teacher = built.student, built.teacher
  sched = step_lib.Schedules.from_config(config, aot.steps_per_epoch(config))
  tx = step_lib.build_optimizer(config, sched)
  state = _abstract(built.state_shape, built.state_sharding)
  batch = _abstract(
    built.batch_shape, parallel.tree_batch_sharding(mesh, built.batch_shape)
  )
  augment = multicrop.make_multicrop(config.crops)
  key = jax.ShapeDtypeStruct(
    (2,), jnp.uint32, sharding=parallel.replicated(mesh)
  )
  crops_shape = jax.eval_shape(augment, key, batch)
  crops = _abstract(
    crops_shape, parallel.tree_batch_sharding(mesh, crops_shape)
  )
  b = config.batch_size
  dims = config_lib.model_dims(config)
  n_global = crops_shape['global_crops'].shape[0]
  n_local = crops_shape['local_crops'].shape[0] if 'local_crops' in crops else 0
  n_views = n_global + n_local
  k = config.model.out_dim
  rows_sharding = parallel.batch_sharding(mesh)
  views_sharding = parallel.batch_sharding(mesh, 1)

  def in_mesh(fn):
    @functools.wraps(fn)
    def wrapped(*args):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return fn(*args)

    return wrapped

  def jit(fn, out_shardings=None):
    return jax.jit(in_mesh(fn), out_shardings=out_shardings)

  def backbone_fwd_bwd(params, images, key, cotangent):
    def forward(p):
      return student.backbone.apply(
        {'params': p}, _rows(images), True, rngs={'drop_path': key}
      )

    out, vjp = jax.vjp(forward, params)
    cotangent = parallel.constrain_batch(cotangent.astype(out.dtype))
    return vjp(cotangent)[0]

  def teacher_forward(params, images):
    return teacher.apply({'params': params}, images)

  def head_and_loss(params, feats, teacher_out, center, teacher_temp):
    def loss_fn(p, x):
      out = student.head.apply({'params': p}, x, True)
      out = jnp.swapaxes(
        parallel.constrain_batch(out).astype(jnp.float32), 0, 1
      )
      loss, _ = loss_lib.dino_loss_and_metrics(
        out,
        teacher_out,
        center,
        teacher_temp=teacher_temp,
        student_temp=config.loss.student_temp,
      )
      return loss

    loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, feats)
    new_center = loss_lib.update_center(
      center, teacher_out, config.loss.center_momentum
    )
    return loss, grads, new_center

  def optimizer_and_ema(state, grads, momentum):
    updates, opt_state = tx.update(grads, state.opt_state, state.student)
    student_params = optax.apply_updates(state.student, updates)
    teacher_params = optax.incremental_update(
      student_params, state.teacher, step_size=1.0 - momentum
    )
    return student_params, teacher_params, opt_state

  replicated = parallel.replicated(mesh)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
  sh = built.state_sharding
  backbone_sh = sh.student['backbone']
  head_sh = sh.student['head']

  # The backbone's output dtype (the head's input), from its trace.
  feature_dtype = jax.eval_shape(
    lambda p, x: student.backbone.apply({'params': p}, x[0]),
    built.state_shape.student['backbone'],
    crops_shape['global_crops'],
  ).dtype

  def features(n):
    return jax.ShapeDtypeStruct(
      (b * n, dims['embed_dim']), feature_dtype, sharding=rows_sharding
    )

  programs = {
    'augmentation': (jit(augment), (key, batch)),
    'student global': (
      jit(backbone_fwd_bwd, backbone_sh),
      (
        state.student['backbone'],
        crops['global_crops'],
        key,
        features(n_global),
      ),
    ),
    'teacher forward': (
      jit(teacher_forward),
      (state.teacher, crops['global_crops']),
    ),
    'head + loss': (
      jit(
        head_and_loss,
        (replicated, (head_sh, rows_sharding), replicated),
      ),
      (
        state.student['head'],
        jax.ShapeDtypeStruct(
          (b, n_views, dims['embed_dim']), feature_dtype, sharding=rows_sharding
        ),
        jax.ShapeDtypeStruct(
          (n_global, b, k), jnp.float32, sharding=views_sharding
        ),
        state.center,
        scalar,
      ),
    ),
    'optimizer + EMA': (
      jit(optimizer_and_ema, (sh.student, sh.teacher, sh.opt_state)),
      (state, state.student, scalar),
    ),
  }
  if n_local:
    programs['student local'] = (
      jit(backbone_fwd_bwd, backbone_sh),
      (state.student['backbone'], crops['local_crops'], key, features(n_local)),
    )
  return {name: programs[name] for name in PARTS if name in programs}


def measure(compiled, devices: int, batch: int) -> dict:
  """XLA's FLOPs and bytes of one compiled program, per device and image."""
  cost = aot.xla_cost(compiled)
  flops, moved = cost['flops'] or 0.0, cost['bytes'] or 0.0
  return {
    'flops_per_device': flops,
    'bytes_per_device': moved,
    'flops_per_image': flops * devices / batch,
    'bytes_per_image': moved * devices / batch,
    'flops_per_byte': flops / moved if moved else None,
    'peak_bytes': aot.memory(compiled)['peak'],
  }


def breakdown(
  config, mesh, platform: str, whole: bool = True, parts=None
) -> dict:
  """Compiles every part (and the whole step) and measures each.

  Args:
    config: the training config.
    mesh: the target's mesh.
    platform: 'tpu', 'gpu' or 'cpu'.
    whole: also compile the whole step.
    parts: names of PARTS to compile (None: all).

  Returns:
    ``{'parts': {name: measure(...) + compile_seconds}, 'sum': ...,
    'step': ...}``; 'step' only with ``whole``.
  """
  devices = mesh.devices.size
  out = {'parts': {}}
  for name, (fn, args) in part_programs(config, mesh, platform).items():
    if parts and name not in parts:
      continue
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    row = measure(compiled, devices, config.batch_size)
    row['compile_seconds'] = round(time.perf_counter() - start, 1)
    out['parts'][name] = row
    print(f'  compiled {name} in {row["compile_seconds"]:.0f} s', flush=True)
  total = {
    key: sum(p[key] for p in out['parts'].values())
    for key in ('flops_per_image', 'bytes_per_image')
  }
  total['flops_per_byte'] = total['flops_per_image'] / total['bytes_per_image']
  out['sum'] = total
  if whole:
    start = time.perf_counter()
    result = aot.compile_step(config, mesh, platform)
    if result.exhausted:
      raise aot.AotError(f'the whole step does not fit: {result.error}')
    row = measure(result.compiled, devices, config.batch_size)
    row['compile_seconds'] = round(time.perf_counter() - start, 1)
    out['step'] = row
    print(f'  compiled the whole step in {row["compile_seconds"]:.0f} s')
  return out


def format_table(result: dict) -> str:
  """The breakdown as a Markdown table, per image."""
  step = result.get('step') or result['sum']
  lines = [
    '| part | GFLOPs / image | GB / image | FLOPs / byte | share of bytes |',
    '|---|---|---|---|---|',
  ]

  def row(name, r):
    intensity = r['flops_per_image'] / r['bytes_per_image']
    share = r['bytes_per_image'] / step['bytes_per_image']
    lines.append(
      f'| {name} | {r["flops_per_image"] / 1e9:.2f} | '
      f'{r["bytes_per_image"] / 1e9:.3f} | {intensity:.1f} | {share:.0%} |'
    )

  for name, r in result['parts'].items():
    row(name, r)
  row('sum of the parts', result['sum'])
  if 'step' in result:
    row('whole step', result['step'])
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from dino_jax import config as config_lib
  from dino_jax import parallel
  from dino_jax.cli import flags as cli_flags

  config = cli_flags.loaded_config(flags.FLAGS)
  try:
    target = aot.parse_topology(flags.FLAGS.topology, flags.FLAGS.slices)
    aot.check_config(config, target, target.num_devices)
    devices = aot.target_devices(target)
    mesh = parallel.make_mesh(
      config.mesh.data, config.mesh.fsdp, devices=devices
    )
    dtype, attention = config_lib.resolve_compute(
      config.model, target.chip.platform
    )
    print(
      f'{target.spec}: {config.model.arch}/{config.model.patch_size}, '
      f'{dtype}, {attention} attention, remat {config.model.remat}; batch '
      f'{config.batch_size} ({config.batch_size // len(devices)} per device)',
      flush=True,
    )
    parts = flags.FLAGS.parts
    unknown = [p for p in parts or () if p not in PARTS]
    if unknown:
      raise ValueError(
        f'--parts={",".join(unknown)} unknown; use some of {",".join(PARTS)}'
      )
    result = breakdown(
      config,
      mesh,
      target.chip.platform,
      whole=flags.FLAGS.whole_step,
      parts=parts,
    )
  except (aot.AotError, config_lib.ConfigError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  result.update(
    topology=target.spec,
    batch_size=config.batch_size,
    dtype=dtype,
    attention=attention,
    remat=bool(config.model.remat),
  )
  print(format_table(result))
  if flags.FLAGS.out:
    with open(flags.FLAGS.out, 'w') as f:
      json.dump(result, f, indent=1)
  print(json.dumps(result), flush=True)


flags.DEFINE_bool(
  'whole_step',
  True,
  'Also compile the whole step (as dino_jax.aot does) for the comparison.',
)

flags.DEFINE_list(
  'parts',
  None,
  'Compile only these parts (comma-separated names as in the table, e.g. '
  '"student global"); default all.',
)

if __name__ == '__main__':
  jax.config.update('jax_platforms', 'cpu')
  app.run(main, flags_parser=aot_cli.parse_flags)
