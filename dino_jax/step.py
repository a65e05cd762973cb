"""Train state and the pure DINO train step (SPEC §4.6).

``train_step(state, batch) -> (state, metrics)``; no grain, orbax or flags
here, so tests, interop and benchmarks import it directly.
"""

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dino_jax import config as config_lib
from dino_jax import loss as loss_lib
from dino_jax import optim, parallel, schedules
from dino_jax.data import multicrop
from dino_jax.models import (
  RESNET_ARCHS,
  DINOHead,
  MultiCropModel,
  VisionTransformer,
)

Batch = dict[str, jax.Array]


_STATE_FIELDS = ('step', 'rng', 'student', 'teacher', 'center', 'opt_state')


@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything a checkpoint holds; one pytree.

  Attributes:
    step: int32 [] optimizer steps done (the global iteration ``it``).
    rng: uint32 [2] base key; step keys are ``fold_in(rng, step)``.
    student: student params ``{'backbone', 'head'}``.
    teacher: teacher params, same structure (EMA of the student).
    center: float32 [1, K] running center of the teacher outputs.
    opt_state: optax state of the student optimizer.
    batch_stats: BatchNorm running statistics, ``{'student': ...,
      'teacher': ...}`` (each ``{'backbone', 'head'}`` as the model has
      them), or None for a model without BatchNorm (the ViT). None is left
      out of the pytree, so a ViT state has the leaves and key paths it had
      before this field existed and its checkpoints restore unchanged.
  """

  step: jax.Array
  rng: jax.Array
  student: Any
  teacher: Any
  center: jax.Array
  opt_state: Any
  batch_stats: Any = None

  def replace(self, **changes) -> 'TrainState':
    return dataclasses.replace(self, **changes)


def _state_flatten(state: TrainState):
  names = _STATE_FIELDS + (
    () if state.batch_stats is None else ('batch_stats',)
  )
  children = [(jax.tree_util.GetAttrKey(n), getattr(state, n)) for n in names]
  return children, state.batch_stats is not None


def _state_unflatten(has_stats: bool, children) -> TrainState:
  return TrainState(*children) if has_stats else TrainState(*children, None)


jax.tree_util.register_pytree_with_keys(
  TrainState, _state_flatten, _state_unflatten
)


@dataclasses.dataclass(frozen=True)
class Schedules:
  """Host arrays indexed in the step (SPEC §4.2, §3)."""

  lr: np.ndarray  # [T] per iteration
  weight_decay: np.ndarray  # [T]
  momentum: np.ndarray  # [T] teacher EMA momentum
  teacher_temp: np.ndarray  # [epochs] per epoch
  steps_per_epoch: int

  @classmethod
  def from_config(
    cls, config: ml_collections.ConfigDict, steps_per_epoch: int
  ) -> 'Schedules':
    o, l = config.optim, config.loss
    peak_lr = o.lr * config.batch_size / 256.0  # linear scaling rule
    return cls(
      lr=schedules.cosine_schedule(
        peak_lr,
        o.min_lr,
        config.epochs,
        steps_per_epoch,
        warmup_epochs=o.warmup_epochs,
      ),
      weight_decay=schedules.cosine_schedule(
        o.weight_decay, o.weight_decay_end, config.epochs, steps_per_epoch
      ),
      momentum=schedules.cosine_schedule(
        o.momentum_teacher, 1.0, config.epochs, steps_per_epoch
      ),
      teacher_temp=schedules.teacher_temp_schedule(
        l.warmup_teacher_temp,
        l.teacher_temp,
        l.warmup_teacher_temp_epochs,
        config.epochs,
      ),
      steps_per_epoch=steps_per_epoch,
    )


def build_models(
  config: ml_collections.ConfigDict, backend: str | None = None
) -> tuple[MultiCropModel, MultiCropModel]:
  """(student, teacher); the teacher has no stochastic depth (SPEC §2.2).

  ``model.arch`` a ViT (``vit_*``) or a ResNet (``resnet18/34/50``: pooled
  features, BatchNorm; SPEC-downstream §5).

  ``model.dtype`` and ``model.attention`` 'auto' are resolved here, for
  ``backend`` ('cpu', 'gpu', 'tpu'; default: JAX's default backend), by
  ``config.resolve_compute`` (docs/precision.md); the resolved values are
  logged.
  """
  m = config.model
  backend = backend or jax.default_backend()
  dtype_name, attention = config_lib.resolve_compute(m, backend)
  logging.info(
    'model compute: dtype %s, attention %s on %s (model.dtype=%r, '
    'model.attention=%r)',
    dtype_name,
    attention,
    backend,
    m.dtype,
    m.attention,
  )
  dtype = jnp.bfloat16 if dtype_name == 'bfloat16' else jnp.float32

  def make(drop_path_rate):
    if m.arch in RESNET_ARCHS:
      # torchvision ResNet without fc (SPEC-downstream §5); no drop path:
      # the official code passes drop_path_rate to ViTs only. BatchNorm
      # statistics in float32 whatever the compute dtype.
      backbone = RESNET_ARCHS[m.arch](width=m.resnet_width, dtype=dtype)
    else:
      backbone = VisionTransformer(
        patch_size=m.patch_size,
        img_size=m.img_size,
        drop_path_rate=drop_path_rate,
        attention=attention,
        dtype=dtype,
        remat=m.remat,
        remat_policy=m.remat_policy,
        scan_blocks=m.scan_blocks,
        **config_lib.model_dims(config),
      )
    head = DINOHead(
      out_dim=m.out_dim,
      use_bn=m.use_bn_in_head,
      norm_last_layer=m.norm_last_layer,
      weight_norm=m.head_weight_norm,
      nlayers=m.head_nlayers,
      hidden_dim=m.head_hidden_dim,
      bottleneck_dim=m.head_bottleneck_dim,
      dtype=dtype,
    )
    return MultiCropModel(backbone, head)

  return make(m.drop_path_rate), make(0.0)


def build_optimizer(
  config: ml_collections.ConfigDict, sched: Schedules
) -> optax.GradientTransformation:
  return optim.make_optimizer(
    config.optim.name,
    sched.lr,
    sched.weight_decay,
    clip_grad=config.optim.clip_grad,
    freeze_steps=config.optim.freeze_last_layer * sched.steps_per_epoch,
  )


def init_state(
  rng: jax.Array,
  model: nn.Module,
  tx: optax.GradientTransformation,
  image_size: int,
  out_dim: int,
) -> TrainState:
  """A fresh state; the teacher starts as an exact copy of the student.

  BatchNorm running statistics (a ResNet, or ``use_bn_in_head``) start at
  mean 0, variance 1 for both; otherwise ``batch_stats`` is None.

  Args:
    rng: uint32 [2] key (``jax.random.PRNGKey``).
    model: the student ``MultiCropModel``.
    tx: the optimizer.
    image_size: global crop size used to trace the init.
    out_dim: K.
  """
  init_rng, state_rng = jax.random.split(rng)
  dummy = jnp.zeros((2, 1, image_size, image_size, 3), jnp.float32)
  variables = model.init(init_rng, dummy)
  params = variables['params']
  stats = variables.get('batch_stats')
  if stats:
    # The official teacher loads the student's state_dict, buffers included.
    stats = {'student': stats, 'teacher': jax.tree.map(jnp.copy, stats)}
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    rng=state_rng,
    student=params,
    teacher=jax.tree.map(jnp.copy, params),
    center=jnp.zeros((1, out_dim), jnp.float32),
    opt_state=tx.init(params),
    batch_stats=stats or None,
  )


def init_fn_for(
  config: ml_collections.ConfigDict,
  student: MultiCropModel,
  tx: optax.GradientTransformation,
) -> Callable[[], TrainState]:
  """``init_state`` bound to the config's seed, crop size and K."""
  return functools.partial(
    init_state,
    jax.random.PRNGKey(config.seed),
    student,
    tx,
    config.crops.global_size,
    config.model.out_dim,
  )


def state_template(
  config: ml_collections.ConfigDict,
) -> tuple[MultiCropModel, optax.GradientTransformation, Callable]:
  """(student, optimizer, init_fn) for a state to restore or seed.

  Schedules use ``config.steps_per_epoch`` (1 when it is derived from the
  data): they only shape the optimizer state here, never its values.
  """
  sched = Schedules.from_config(config, max(config.steps_per_epoch, 1))
  student, _ = build_models(config)
  tx = build_optimizer(config, sched)
  return student, tx, init_fn_for(config, student, tx)


def teacher_backbone(state: TrainState) -> Any:
  """What evaluations apply the teacher backbone with (``eval/features``).

  Its params, or for a backbone with BatchNorm (a ResNet) ``{'params',
  'batch_stats'}``: the teacher's running statistics, for inference mode.
  """
  params = state.teacher['backbone']
  stats = (state.batch_stats or {}).get('teacher', {}).get('backbone')
  if not stats:
    return params
  return {'params': params, 'batch_stats': stats}


def _lookup(table: np.ndarray, index: jax.Array) -> jax.Array:
  values = jnp.asarray(table, jnp.float32)
  return values[jnp.minimum(index, len(table) - 1)]


def _batch_norm_over_mesh(model: MultiCropModel) -> MultiCropModel:
  """``model`` whose BatchNorms average over the mesh's batch axes.

  For a ``shard_map`` over the batch (``parallel.value_and_grad_scattered``):
  the statistics of the global batch, as GSPMD computes them. Parts without
  BatchNorm (the ViT) are unchanged.
  """
  parts = {
    name: part.clone(axis_name=parallel.BATCH_AXES)
    for name, part in (('backbone', model.backbone), ('head', model.head))
    if hasattr(part, 'axis_name')
  }
  return model.clone(**parts) if parts else model


def make_train_step(
  student: MultiCropModel,
  teacher: MultiCropModel,
  tx: optax.GradientTransformation,
  sched: Schedules,
  *,
  student_temp: float = 0.1,
  center_momentum: float = 0.9,
  augment: Callable[[jax.Array, Batch], Batch] | None = None,
  grad_reduce: str = 'gspmd',
  fsdp_min_size: int = 2**18,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds the pure train step.

  Args:
    student: student model (with drop path).
    teacher: teacher model (same structure, no drop path).
    tx: the student optimizer (``build_optimizer``).
    sched: schedules.
    student_temp: tau_s.
    center_momentum: m_c.
    augment: optional ``(key, batch) -> crops`` run inside the step (the
      on-device multi-crop); without it the batch holds the crops.
    grad_reduce: ``mesh.grad_reduce``. 'scatter': traced in a mesh with
      fsdp > 1, the student's loss and gradients are computed on each
      device's rows (``parallel.value_and_grad_scattered``), so the split
      parameters' gradients are reduce-scattered to their shards (in the
      model's compute dtype, as GSPMD reduces a bf16 matmul's); the same
      numbers as 'gspmd' (GSPMD partitions the whole step) to float
      rounding. Elsewhere both are the 'gspmd' step.
    fsdp_min_size: ``mesh.fsdp_min_size`` (which parameters are split).

  Returns:
    ``train_step(state, batch) -> (state, metrics)``; the batch (or the
    output of ``augment``) has ``global_crops`` [2, B, H, W, 3] and optionally
    ``local_crops`` [L, B, h, w, 3].
  """

  def train_step(state: TrainState, batch: Batch):
    step = state.step
    key = jax.random.fold_in(state.rng, step)
    augment_key, drop_path_key = jax.random.split(key)
    crops = augment(augment_key, batch) if augment is not None else batch
    global_crops = crops['global_crops']
    local_crops = crops.get('local_crops')

    epoch = step // sched.steps_per_epoch
    teacher_temp = _lookup(sched.teacher_temp, epoch)
    stats = state.batch_stats
    # Teacher on the two global crops only; it never gets gradients.
    if stats is None:
      teacher_out = teacher.apply({'params': state.teacher}, global_crops)
    else:
      # SPEC-downstream §5: the teacher is never in eval mode: it normalises
      # with the statistics of its batch and updates its own running ones.
      teacher_out, teacher_vars = teacher.apply(
        {'params': state.teacher, 'batch_stats': stats['teacher']},
        global_crops,
        None,
        True,
        mutable=['batch_stats'],
      )
    teacher_out = jax.lax.stop_gradient(teacher_out)

    def loss_fn(params, batched, replicated, model=student):
      global_crops, local_crops, teacher_out = batched
      center, teacher_temp, drop_path_key, student_stats = replicated
      run = functools.partial(
        model.apply,
        rngs={'drop_path': drop_path_key},
      )
      if student_stats is None:
        student_vars = None
        student_out = run({'params': params}, global_crops, local_crops, True)
      else:
        # One backbone pass per resolution (MultiCropModel): each updates
        # the running statistics, as the official MultiCropWrapper's two.
        student_out, student_vars = run(
          {'params': params, 'batch_stats': student_stats},
          global_crops,
          local_crops,
          True,
          mutable=['batch_stats'],
        )
      loss, aux = loss_lib.dino_loss_and_metrics(
        student_out,
        teacher_out,
        center,
        teacher_temp=teacher_temp,
        student_temp=student_temp,
      )
      return loss, (aux, student_vars)

    batched = (global_crops, local_crops, teacher_out)
    replicated = (
      state.center,
      teacher_temp,
      drop_path_key,
      None if stats is None else stats['student'],
    )
    mesh = jax.sharding.get_abstract_mesh()
    if grad_reduce == 'scatter' and not mesh.empty and mesh.shape['fsdp'] > 1:
      # Each device's rows in a shard_map: the split parameters' gradients
      # reduce-scattered to their shards (parallel.value_and_grad_scattered)
      # and BatchNorm statistics averaged over the global batch.
      loss, (aux, student_vars), grads = parallel.value_and_grad_scattered(
        functools.partial(loss_fn, model=_batch_norm_over_mesh(student)),
        state.student,
        batched,
        replicated,
        fsdp_min_size,
        # Gathered and reduced in bf16 where the model computes in it.
        compute_dtype=getattr(student.backbone, 'dtype', None),
      )
    else:
      (loss, (aux, student_vars)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
      )(state.student, batched, replicated)
    updates, opt_state = tx.update(grads, state.opt_state, state.student)
    new_student = optax.apply_updates(state.student, updates)
    momentum = _lookup(sched.momentum, step)
    # SPEC §4.5: after the optimizer step, over all parameters (and only
    # them: each model keeps its own BatchNorm running statistics).
    new_teacher = optax.incremental_update(
      new_student, state.teacher, step_size=1.0 - momentum
    )
    center = loss_lib.update_center(state.center, teacher_out, center_momentum)
    prototypes = jnp.argmax(teacher_out, axis=-1)  # [2, B], B split
    metrics = {
      'loss': loss,
      # 1.0 while every updated student parameter is finite; the loop never
      # saves a state whose flag is 0 (a huge lr can overflow the weights
      # while the loss, computed before the update, is still finite).
      'state_finite': jnp.all(
        jnp.stack(
          [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_student)]
        )
      ).astype(jnp.float32),
      'teacher_entropy': aux['teacher_entropy'],
      'kl': aux['kl'],
      'lr': _lookup(sched.lr, step),
      'wd': _lookup(sched.weight_decay, step),
      'momentum': momentum,
      'teacher_temp': teacher_temp,
      'grad_norm': optax.tree.norm(grads),
      'center_norm': jnp.linalg.norm(center),
      # Prototypes that are some row's argmax. Counted by a scatter-add:
      # each device adds its own rows, then one all-reduce of [K] (a scatter
      # of set values gathered every row's index onto every device).
      'teacher_prototypes': jnp.sum(
        jnp.zeros(teacher_out.shape[-1], jnp.int32).at[prototypes].add(1) > 0
      ),
    }
    new_state = state.replace(
      step=step + 1,
      student=new_student,
      teacher=new_teacher,
      center=center,
      opt_state=opt_state,
    )
    if stats is not None:
      new_state = new_state.replace(
        batch_stats={
          'student': student_vars['batch_stats'],
          'teacher': teacher_vars['batch_stats'],
        }
      )
    return new_state, metrics

  return train_step


@dataclasses.dataclass(frozen=True)
class ShardedStep:
  """The train step as the training program compiles it.

  Attributes:
    jitted: ``(state, batch) -> (state, metrics)``, jitted over the mesh
      with the state donated; the batch holds uint8 canvases and the
      multi-crop augmentation runs inside.
    init_fn: ``() -> TrainState``, a fresh state (the config's seed).
    state_shape: the state's shapes (``jax.eval_shape(init_fn)``).
    state_sharding: the state's shardings (``parallel.state_sharding``).
    batch_shape: the global batch's shapes: ``image`` uint8 [B, C, C, 3],
      ``size`` int32 [B, 2], ``label`` int32 [B].
    student: the student model.
    teacher: the teacher model.
  """

  jitted: Callable
  init_fn: Callable[[], TrainState]
  state_shape: Any
  state_sharding: Any
  batch_shape: dict[str, jax.ShapeDtypeStruct]
  student: MultiCropModel
  teacher: MultiCropModel


def build_sharded_step(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  steps_per_epoch: int,
  backend: str | None = None,
) -> ShardedStep:
  """Models, optimizer, state shardings and the jitted step for ``mesh``.

  The one place the training program (``train.py``) and the ahead-of-time
  compile (``dino_jax.aot``) build the step, so both compile the same program.

  Args:
    config: the run's config.
    mesh: the device mesh (``parallel.make_mesh``).
    steps_per_epoch: iterations per epoch (the schedules' unit).
    backend: the platform the step is compiled for; resolves
      ``model.dtype``/``model.attention`` 'auto' (default: JAX's).
  """
  sched = Schedules.from_config(config, steps_per_epoch)
  student, teacher = build_models(config, backend)
  tx = build_optimizer(config, sched)
  train_step = make_train_step(
    student,
    teacher,
    tx,
    sched,
    student_temp=config.loss.student_temp,
    center_momentum=config.loss.center_momentum,
    augment=multicrop.make_multicrop(config.crops),
    grad_reduce=config.mesh.grad_reduce,
    fsdp_min_size=config.mesh.fsdp_min_size,
  )
  init_fn = init_fn_for(config, student, tx)
  state_shape = jax.eval_shape(init_fn)
  state_sharding = parallel.state_sharding(
    mesh, state_shape, config.mesh.fsdp_min_size
  )
  c = config.data.canvas_size
  batch_shape = {
    'image': jax.ShapeDtypeStruct((config.batch_size, c, c, 3), np.uint8),
    'size': jax.ShapeDtypeStruct((config.batch_size, 2), np.int32),
    'label': jax.ShapeDtypeStruct((config.batch_size,), np.int32),
  }
  jitted = parallel.jit_train_step(
    train_step, mesh, state_sharding, batch_shape
  )
  return ShardedStep(
    jitted=jitted,
    init_fn=init_fn,
    state_shape=state_shape,
    state_sharding=state_sharding,
    batch_shape=batch_shape,
    student=student,
    teacher=teacher,
  )
