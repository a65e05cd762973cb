"""The training loop: mesh, data, state, resume, step, log, eval, checkpoint.

No math here: the step is ``step.make_train_step``, the augmentation
``data.multicrop``, the evaluation ``eval.run``.
"""

import logging
import os
import signal

import jax
import ml_collections
import numpy as np

from dino_jax import checkpoint as checkpoint_lib
from dino_jax import config as config_lib
from dino_jax import metrics as metrics_lib
from dino_jax import parallel
from dino_jax import step as step_lib
from dino_jax.data import multicrop, pipeline, sources

logger = logging.getLogger(__name__)


class Preemption:
  """Turns SIGTERM into a flag checked at step boundaries."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del frame
      logger.warning('signal %d: saving at the next step boundary', signum)
      self.requested = True

    self._previous = signal.signal(signal.SIGTERM, handler)
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def steps_of(config: ml_collections.ConfigDict, dataset_size: int):
  """(steps_per_epoch, total_steps) from the config and the data size."""
  steps_per_epoch = config.steps_per_epoch
  if steps_per_epoch <= 0:
    steps_per_epoch = dataset_size // config.batch_size
    if steps_per_epoch == 0:
      raise config_lib.ConfigError(
        f'batch_size={config.batch_size} exceeds the {dataset_size} images'
      )
  total = config.epochs * steps_per_epoch
  if config.total_steps > 0:
    total = min(total, config.total_steps)
  return steps_per_epoch, total


def _warn_settings(config):
  if config.loss.teacher_temp > 0.07:
    logger.warning(
      'loss.teacher_temp=%s > 0.07: the official help calls this unstable',
      config.loss.teacher_temp,
    )
  if config.batch_size < 256 and config.optim.momentum_teacher < 0.9995:
    logger.warning(
      'batch_size=%d < 256 with momentum_teacher=%s: the official help '
      'suggests 0.9995 for batch 256 and below',
      config.batch_size,
      config.optim.momentum_teacher,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from ``workdir``), evaluates, returns the last metrics."""
  config_lib.validate(config, jax.device_count())
  _warn_settings(config)
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  logger.info(
    'mesh %s over %d devices, %d processes',
    dict(mesh.shape),
    jax.device_count(),
    jax.process_count(),
  )
  source = sources.make_source(config.data)
  logger.info('data: %r (%d images)', source, len(source))
  steps_per_epoch, total_steps = steps_of(config, len(source))
  logger.info(
    'epochs %d x %d steps/epoch = %d steps; training %d steps; global '
    'batch %d; peak lr %.3g',
    config.epochs,
    steps_per_epoch,
    config.epochs * steps_per_epoch,
    total_steps,
    config.batch_size,
    config.optim.lr * config.batch_size / 256,
  )
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json(indent=2))

  sched = step_lib.Schedules.from_config(config, steps_per_epoch)
  student, teacher = step_lib.build_models(config)
  tx = step_lib.build_optimizer(config, sched)
  train_step = step_lib.make_train_step(
    student,
    teacher,
    tx,
    sched,
    student_temp=config.loss.student_temp,
    center_momentum=config.loss.center_momentum,
    augment=multicrop.make_multicrop(config.crops),
  )
  init_fn = step_lib.init_fn_for(config, student, tx)
  state_shape = jax.eval_shape(init_fn)
  state_sharding = parallel.state_sharding(
    mesh, state_shape, config.mesh.fsdp_min_size
  )

  dataset = pipeline.train_dataset(
    source,
    batch_size=config.batch_size // jax.process_count(),
    canvas_size=config.data.canvas_size,
    seed=config.seed,
    num_workers=config.data.num_workers,
  )
  data_iter = iter(dataset)
  ckpt = checkpoint_lib.Checkpointer(
    os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints
  )
  start = ckpt.latest_step()
  if start is not None:
    checkpoint_lib.check_compatible(ckpt.saved_config(start), config, workdir)
    logger.info('resuming from step %d in %s', start, workdir)
    state = ckpt.restore(
      start,
      checkpoint_lib.abstract_like(state_shape, state_sharding),
      data_iter,
    )
  else:
    start = 0
    state = jax.jit(init_fn, out_shardings=state_sharding)()
  last_saved = start if start > 0 else None

  c = config.data.canvas_size
  batch_shape = {
    'image': jax.ShapeDtypeStruct((config.batch_size, c, c, 3), np.uint8),
    'size': jax.ShapeDtypeStruct((config.batch_size, 2), np.int32),
    'label': jax.ShapeDtypeStruct((config.batch_size,), np.int32),
  }
  jitted = parallel.jit_train_step(
    train_step, mesh, state_sharding, batch_shape
  )
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  progress = metrics_lib.Progress(start, total_steps, config.batch_size)
  scalars = {}
  step = start
  with Preemption() as preemption:
    while step < total_steps:
      batch = pipeline.global_batch(mesh, next(data_iter))
      state, metrics = jitted(state, batch)
      step += 1
      log_now = step % config.log_every_steps == 0 or step == total_steps
      # Read the SIGTERM flag once per step: a signal arriving between the
      # save decision and the exit check must not skip the save.
      preempted = preemption.requested
      save_now = (
        step % config.checkpoint_every_steps == 0
        or step == total_steps
        or preempted
        or ckpt.reached_preemption(step)
      )
      if log_now or save_now:
        scalars = jax.device_get(metrics)
        scalars = {k: float(v) for k, v in scalars.items()}
        try:
          warnings = metrics_lib.check_health(
            step, scalars, config.model.out_dim, last_saved
          )
        except metrics_lib.NonFiniteLossError:
          _close(ckpt, writer, data_iter)  # finish the last good save
          raise
        for warning in warnings:
          logger.warning('step %d: %s', step, warning)
      if log_now:
        scalars.update(progress.update(step))
        scalars['epoch'] = step / steps_per_epoch
        writer.write(step, scalars)
        logger.info(
          'step %d/%d  epoch %.2f  loss %.4f  H_t %.3f  lr %.3g  wd %.3g  '
          'm %.5f  %.1f img/s  ETA %s',
          step,
          total_steps,
          scalars['epoch'],
          scalars['loss'],
          scalars['teacher_entropy'],
          scalars['lr'],
          scalars['wd'],
          scalars['momentum'],
          scalars['images_per_sec'],
          metrics_lib.format_eta(scalars['eta_sec']),
        )
      if save_now:
        ckpt.save(step, state, data_iter, config)
        last_saved = step
      if preempted:
        logger.warning('preempted: saved step %d, exiting', step)
        _close(ckpt, writer, data_iter)
        return scalars
      if (
        config.eval_every_steps > 0
        and step % config.eval_every_steps == 0
        and step < total_steps
      ):
        _evaluate(config, workdir, mesh, state, step)
  _close(ckpt, writer, data_iter)
  results = _evaluate(config, workdir, mesh, state, step)
  return {**scalars, **results}


def _close(ckpt, writer, data_iter) -> None:
  ckpt.wait()
  ckpt.close()
  writer.close()
  close = getattr(data_iter, 'close', None)  # stops grain worker processes
  if close is not None:
    close()


def _evaluate(config, workdir, mesh, state, step) -> dict:
  from dino_jax.eval import run as eval_run  # eval imports are heavier

  return eval_run.after_training(config, workdir, mesh, state, step)
