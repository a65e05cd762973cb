"""The training loop: mesh, data, state, resume, step, log, eval, checkpoint.

No math here: the step is ``step.make_train_step``, the augmentation
``data.multicrop``, the evaluation ``eval.run``.
"""

import contextlib
import logging
import os
import signal
import sys

import jax
import ml_collections
import numpy as np

from dino_jax import checkpoint as checkpoint_lib
from dino_jax import config as config_lib
from dino_jax import metrics as metrics_lib
from dino_jax import parallel, storage
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib
from dino_jax.data import pipeline, sources

logger = logging.getLogger(__name__)


class _StopWaiting(Exception):
  """Raised by the signal handler to leave a wait for data."""


class Preemption:
  """SIGTERM and the first Ctrl-C: save at the next step boundary and exit.

  One process: Python handlers set ``signal_name``; while the loop waits for
  data or evaluates (``interruptible``), the handler raises ``_StopWaiting``
  so that neither a stalled input pipeline nor a long evaluation can delay
  the save past the scheduler's grace period. Several processes: every
  process must save the same step (the save is collective), so SIGTERM
  stays with JAX's preemption notifier, which tells all processes through
  the coordination service, and ``stop_at`` is JAX's preemption sync point
  (True at the same step on every process); Ctrl-C sends SIGTERM to its own
  process to take that path. A second Ctrl-C raises KeyboardInterrupt at
  once (no save).

  Python swallows an exception raised where a finalizer, a weakref or a gc
  callback runs, and a handler may run there: such a lost ``_StopWaiting``
  or KeyboardInterrupt reaches ``sys.unraisablehook``, which here raises it
  again 10 ms later from a SIGALRM handler (else a stalled pipeline or a
  long evaluation would hold the save back, and a traceback would say
  "Exception ignored").
  """

  def __init__(self, multiprocess: bool = False):
    self.multiprocess = multiprocess
    self.signal_name = None
    self.aborted = False
    self._interruptible = False
    self._in_region = False
    self._abort_lost = False
    self._entered = False
    self._hooks = None
    self._previous = {}

  def __enter__(self):
    signals = [signal.SIGINT] + ([] if self.multiprocess else [signal.SIGTERM])
    for signum in signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    if not self.multiprocess:
      self._previous[signal.SIGALRM] = signal.signal(
        signal.SIGALRM, self._raise_again
      )
      previous_hook = sys.unraisablehook

      def hook(unraisable):
        if self._entered and self._lost(unraisable.exc_value):
          return
        previous_hook(unraisable)

      self._hooks = (hook, previous_hook)
      sys.unraisablehook = hook  # passes all on once the block has ended
    self._entered = True
    return self

  def __exit__(self, *exc):
    self._entered = False
    if not self.multiprocess:
      signal.setitimer(signal.ITIMER_REAL, 0)
      hook, previous_hook = self._hooks
      if sys.unraisablehook is hook:  # else another hook wraps ours: keep
        sys.unraisablehook = previous_hook
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _lost(self, error) -> bool:
    """Schedules a swallowed ``_StopWaiting`` or second-Ctrl-C interrupt
    to be raised again; whether ``error`` was one."""
    if isinstance(error, _StopWaiting):
      if self._in_region:
        self._interruptible = True
    elif isinstance(error, KeyboardInterrupt) and self.aborted:
      self._abort_lost = True
    else:
      return False
    signal.setitimer(signal.ITIMER_REAL, 0.01)
    return True

  def _raise_again(self, signum, frame):
    del signum, frame
    if self._abort_lost:
      self._abort_lost = False
      raise KeyboardInterrupt
    if self._interruptible:
      self._interruptible = False
      raise _StopWaiting

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is not None:
      if signum == signal.SIGINT:
        # Second Ctrl-C: stop now, no save. Also remembered, as Python
        # swallows an exception raised where a finalizer or gc callback runs.
        self.aborted = True
        raise KeyboardInterrupt
      return
    self.signal_name = name
    logger.warning(
      '%s: saving at the next step boundary, then exiting%s',
      name,
      ' (press Ctrl-C again to exit at once without saving)'
      if signum == signal.SIGINT
      else '',
    )
    if self.multiprocess:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier: all processes
    elif self._interruptible:
      self._interruptible = False  # once: cleanup code is not interrupted
      raise _StopWaiting

  @contextlib.contextmanager
  def interruptible(self):
    """A signal inside the block raises ``_StopWaiting`` (one process).

    Several processes keep going: they stop together, at ``stop_at``.
    """
    if self.signal_name is not None and not self.multiprocess:
      raise _StopWaiting
    self._interruptible = self._in_region = not self.multiprocess
    try:
      yield
    finally:
      self._interruptible = self._in_region = False

  def next_batch(self, data_iter):
    """``next(data_iter)``; a signal meanwhile raises ``_StopWaiting``."""
    with self.interruptible():
      return next(data_iter)

  def stop_at(self, step: int) -> bool:
    """Whether to save ``step`` and stop; the same on every process."""
    if self.aborted:
      raise KeyboardInterrupt
    if self.multiprocess:
      from jax.experimental import multihost_utils

      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal_name is not None


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
  """Trains (resuming from ``workdir``), evaluates, returns the last metrics.

  Holds ``WORKDIR/lock`` (process 0) for the whole run. After a SIGTERM or
  Ctrl-C the result has ``stopped_by`` set to the signal's name.
  """
  config_lib.validate(config, jax.device_count())
  _warn_settings(config)
  workdir_lib.check_path(workdir)
  source = sources.make_source(config.data)
  logger.info('data: %r (%d images)', source, len(source))
  steps_per_epoch, total_steps = steps_of(config, len(source))
  lock = None
  if jax.process_index() == 0:
    workdir_lib.create(workdir)
    lock = workdir_lib.lock(workdir)
    lock.acquire()
  try:
    return _train(config, workdir, source, steps_per_epoch, total_steps)
  finally:
    if lock is not None:
      lock.release()


def _train(config, workdir, source, steps_per_epoch, total_steps) -> dict:
  # Signals are handled from the start: during the restore, the data
  # workers' start and the compiles a Ctrl-C or SIGTERM is recorded and the
  # run stops at the top of the loop, before the first step. (Python's
  # default KeyboardInterrupt could be raised inside a gc callback, which
  # Python swallows: the run went on as if no Ctrl-C had come.)
  with Preemption(jax.process_count() > 1) as preemption:
    return _run(
      preemption, config, workdir, source, steps_per_epoch, total_steps
    )


def _run(
  preemption, config, workdir, source, steps_per_epoch, total_steps
) -> dict:
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  logger.info(
    'mesh %s over %d devices, %d processes',
    dict(mesh.shape),
    jax.device_count(),
    jax.process_count(),
  )
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
  built = step_lib.build_sharded_step(config, mesh, steps_per_epoch)
  init_fn, state_sharding = built.init_fn, built.state_sharding
  state_shape = built.state_shape
  abstract = checkpoint_lib.abstract_like(state_shape, state_sharding)

  def check(saved: dict):
    checkpoint_lib.check_compatible(saved, config, workdir)
    return abstract

  ckpt = checkpoint_lib.Checkpointer(
    storage.join(workdir, 'checkpoints'), keep=config.keep_checkpoints
  )
  try:
    restored = ckpt.restore_newest(check)
  except BaseException:
    ckpt.close()
    raise
  if restored is not None:
    start, _, state = restored
    logger.info('resuming from step %d in %s', start, workdir)
  else:
    start = 0
    state = jax.jit(init_fn, out_shardings=state_sharding)()
  # Only now, after the compatibility check: config.json describes the
  # checkpoints in the workdir.
  if jax.process_index() == 0:
    storage.write_text(
      storage.join(workdir, 'config.json'), config.to_json(indent=2)
    )

  jitted = built.jitted
  # The data position is the step: batch k is fixed by the config.
  data_iter = iter(
    pipeline.train_dataset(
      source,
      batch_size=config.batch_size,
      rows=parallel.process_rows(mesh, config.batch_size),
      canvas_size=config.data.canvas_size,
      seed=config.seed,
      num_workers=config.data.num_workers,
      start_batch=start,
    )
  )
  skipped = pipeline.SkippedFiles(source)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start)
  progress = metrics_lib.Progress(start, total_steps, config.batch_size)
  scalars, metrics, in_flight, pending = {}, None, None, None
  last_saved = start if start > 0 else None
  step = start

  def fetch_checked():
    """Metrics of the last step as floats; raises if the state is bad."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    try:
      warnings = metrics_lib.check_health(
        step, values, config.model.out_dim, last_saved
      )
    except metrics_lib.NonFiniteLossError:
      _close(ckpt, writer, data_iter)  # finish the last good save
      raise
    for warning in warnings:
      logger.warning('step %d: %s', step, warning)
    return values

  with _stop_workers_if_interrupted(writer, data_iter, lambda: metrics):
    if _evaluation_missing(config, writer, start, total_steps):
      # A signal stopped this step's evaluation after the step was saved:
      # evaluate it now, or its point of the learning curve is lost.
      logger.info('step %d was saved before its evaluation: evaluating', start)
      results = _evaluate_unless_stopped(
        preemption, config, workdir, mesh, state, start, final=False
      )
      if results is not None:  # else stopped: the top of the loop exits
        writer.write(start, _knn_scalars(results))
    while True:
      if preemption.stop_at(step):
        if last_saved != step and metrics is not None:
          scalars = fetch_checked()
          ckpt.save(step, state, config)
          last_saved = step
        logger.warning(
          '%s: %s, exiting; rerun the same command to resume',
          preemption.signal_name or 'preemption notice',
          f'saved step {last_saved} in {workdir}'
          if last_saved is not None
          else 'no step done yet, nothing to save',
        )
        _close(ckpt, writer, data_iter)
        return {**scalars, 'stopped_by': preemption.signal_name or 'SIGTERM'}
      if step >= total_steps:
        break
      if pending is None:  # the first step, or the read ahead was stopped
        pending = _read_batch(preemption, data_iter, mesh)
        if pending is None:
          continue  # a signal came while waiting: save now
      skipped_rows, batch = pending
      pending = None
      skipped.update(skipped_rows)
      state, metrics = jitted(state, batch)
      step += 1
      # Double buffering: the next batch is read and its transfer to the
      # devices started while this step runs, so the step after it finds
      # its input on the devices. (A signal meanwhile: the top of the loop
      # saves; the batch read ahead is dropped, as the data position is the
      # step.)
      if step < total_steps:
        pending = _read_batch(preemption, data_iter, mesh)
      # At most one step queued behind the running one: the loop waits for
      # the previous step (the device has this one queued meanwhile).
      # Without this, async dispatch let the loop run up to log_every_steps
      # ahead of the device, and a signal's save waited for all of them
      # (demo on one core: signal at step 61, saved step 74 after 20 s; a
      # scheduler's grace period may be shorter).
      if in_flight is not None:
        jax.block_until_ready(in_flight)
      in_flight = metrics
      log_now = step % config.log_every_steps == 0 or step == total_steps
      save_now = step % config.checkpoint_every_steps == 0 or (
        step == total_steps
      )
      if log_now or save_now:
        scalars = fetch_checked()
      if log_now:
        scalars.update(progress.update(step))
        scalars['epoch'] = step / steps_per_epoch
        scalars['skipped_images'] = len(skipped.seen)
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
        ckpt.save(step, state, config)
        last_saved = step
      if (
        config.eval_every_steps > 0
        and step % config.eval_every_steps == 0
        and step < total_steps
      ):
        results = _evaluate_unless_stopped(
          preemption, config, workdir, mesh, state, step, final=False
        )
        if results is not None:  # else stopped: the top of the loop saves
          writer.write(step, _knn_scalars(results))
    _close(ckpt, None, data_iter)  # the last step is saved
    try:
      results = _evaluate_unless_stopped(
        preemption, config, workdir, mesh, state, step
      )
      if results is None:
        logger.warning(
          '%s: stopped the evaluation, exiting; step %d is saved in %s; '
          'rerun the same command to evaluate',
          preemption.signal_name,
          step,
          workdir,
        )
        return {**scalars, 'stopped_by': preemption.signal_name}
      writer.write(step, _knn_scalars(results), replace=True)
    finally:
      writer.close()
  return {**scalars, **results}


def _read_batch(preemption, data_iter, mesh):
  """(skipped, global batch): the next batch, its transfer to the devices
  started; None when a signal stopped the wait (or, after a signal, the
  input pipeline failed: a worker killed with the process group)."""
  try:
    local = preemption.next_batch(data_iter)
  except _StopWaiting:
    return None
  except Exception:
    if preemption.signal_name is None:
      raise
    # The state is whole: the top of the loop saves it.
    logger.warning('input pipeline stopped after the signal', exc_info=1)
    return None
  skipped = local.pop('skipped')
  return skipped, pipeline.global_batch(mesh, local)


def _evaluation_missing(config, writer, step: int, total_steps: int) -> bool:
  """Whether ``step``, restored, is an ``eval_every_steps`` step whose k-NN
  is not in ``metrics.jsonl`` (the same answer on every process)."""
  every = config.eval_every_steps
  if not (config.eval.knn and every > 0 and 0 < step < total_steps):
    return False
  if step % every:
    return False
  missing = not writer.has_evaluation(step) if writer.active else False
  if jax.process_count() > 1:  # process 0 holds metrics.jsonl
    from jax.experimental import multihost_utils

    missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
  return missing


def _evaluate_unless_stopped(preemption, *args, **kwargs) -> dict | None:
  """``_evaluate``, or None when a signal stopped it.

  SIGTERM and Ctrl-C stop an evaluation at once (one process) so that the
  run saves and exits within the scheduler's grace period; an evaluation
  writes nothing partial.
  """
  try:
    with preemption.interruptible():
      return _evaluate(*args, **kwargs)
  except _StopWaiting:
    return None
  except Exception as error:
    if preemption.signal_name is None:
      raise
    # Stopped by the signal some other way (e.g. a data worker killed with
    # the process group): the train state is whole.
    logger.warning(
      'evaluation failed after the signal: %s', ' '.join(str(error).split())
    )
    return None


def _knn_scalars(results: dict) -> dict[str, float]:
  """k-NN top-1 per feature set and k, as metrics.jsonl columns.

  e.g. ``knn_trained_k20``: the learning curve (``python -m dino_jax.plot``).
  """
  return {
    f'knn_{name}_k{int(k)}': float(row['top1'])
    for name, table in results.get('knn', {}).items()
    for k, row in table.items()
  }


@contextlib.contextmanager
def _stop_workers_if_interrupted(writer, data_iter, in_flight):
  """A second Ctrl-C (KeyboardInterrupt): exit without saving, but leave
  nothing behind: the data workers are stopped (their buffered batches'
  shared memory freed; else the resource tracker frees it at exit, with a
  warning about leaked objects), and the last step dispatched, which holds
  its input batch until it ends, is waited for. A save in flight is left
  unfinished (Orbax never restores its temporary directory).

  Args:
    writer: the run's MetricWriter.
    data_iter: the training batches.
    in_flight: returns the metrics of the last step dispatched, or None.
  """
  try:
    yield
  except KeyboardInterrupt:
    close = getattr(data_iter, 'close', None)
    if close is not None:
      close()
    writer.close()
    pending = in_flight()
    if pending is not None:
      jax.block_until_ready(pending)
    raise


def _close(ckpt, writer, data_iter) -> None:
  close = getattr(data_iter, 'close', None)  # stops grain worker processes
  if close is not None:
    close()
  ckpt.wait()
  ckpt.close()
  if writer is not None:
    writer.close()


def _evaluate(config, workdir, mesh, state, step, final=True) -> dict:
  from dino_jax.eval import run as eval_run  # eval imports are heavier

  return eval_run.after_training(config, workdir, mesh, state, step, final)
