"""The training loop: mesh, data, state, resume, step, log, eval, checkpoint.

No math here: the step is ``step.make_train_step``, the augmentation
``data.multicrop``, the evaluation ``evaluation.run``.

Signals (the shell records them, ``dino_jax/cli/signals.py``; the loop
polls the record, ``dino_jax/interrupt.py``):

- SIGTERM or a first Ctrl-C: ``_Training._stop_requested`` at the top of
  the next step saves the last step done and exits (main.py: status 0, or
  130 for Ctrl-C). A wait for data polls the record (``interrupt.Reader``),
  an evaluation stops between batches (``interrupt.Stopped``); its step is
  saved, and the next run evaluates it first (``_evaluation_missing``).
- A second Ctrl-C: KeyboardInterrupt where the loop next polls; no save;
  ``_Training.run`` stops the data workers, main.py exits 130.
- SIGKILL: nothing runs here. The steps since the last checkpoint are lost
  (the data is decoded on threads: no process or shared memory is left,
  ``pipeline.read``), and the next run resumes from the newest intact
  checkpoint (``checkpoint.py``).
- Several processes: SIGTERM goes to JAX's preemption notifier, and all
  processes stop at the same step: Orbax's
  ``CheckpointManager.reached_preemption`` (JAX's preemption sync point).
"""

import contextlib
import logging
from collections.abc import Callable

import jax
import ml_collections

from dino_jax import checkpoint as checkpoint_lib
from dino_jax import config as config_lib
from dino_jax import interrupt, parallel, storage
from dino_jax import metrics as metrics_lib
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib
from dino_jax.data import pipeline, sources

logger = logging.getLogger(__name__)


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


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  hold: Callable[[str], contextlib.AbstractContextManager] | None = None,
) -> dict:
  """Trains (resuming from ``workdir``), evaluates, returns the last metrics.

  After a SIGTERM or Ctrl-C (recorded by the shell in the active
  ``interrupt.Record``) the result has ``stopped_by`` set to the signal's
  name.

  Args:
    config: the run's config.
    workdir: a local directory or a URL; created by process 0.
    hold: ``hold(workdir)``, a context manager that process 0 holds for
      the whole run once the workdir exists: the shell's one-run-per-workdir
      lock (``cli.lock.lock``); None: nothing held.
  """
  config_lib.validate(config, jax.device_count())
  for line in config_lib.advice(config):
    logger.warning('%s', line)
  workdir_lib.check_path(workdir)
  source = sources.make_source(config.data)
  logger.info('data: %r (%d images)', source, len(source))
  steps_per_epoch, total_steps = steps_of(config, len(source))
  held = contextlib.nullcontext()
  if jax.process_index() == 0:
    workdir_lib.create(workdir)
    if hold is not None:
      held = hold(workdir)
  with held:
    # A signal during the restore, the data's start or the compiles stops
    # the run before its first step (the loop's top).
    training = _Training(config, workdir, source, steps_per_epoch, total_steps)
    return training.run()


class _Training:
  """One run: ``__init__`` sets it up, ``run`` trains, evaluates, ends."""

  def __init__(self, config, workdir, source, steps_per_epoch, total_steps):
    self.config, self.workdir = config, workdir
    self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
    self.mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    logger.info(
      'mesh %s over %d devices, %d processes',
      dict(self.mesh.shape),
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
    built = step_lib.build_sharded_step(config, self.mesh, steps_per_epoch)
    self.jitted = built.jitted
    self.ckpt = checkpoint_lib.Checkpointer(
      storage.join(workdir, 'checkpoints'), keep=config.keep_checkpoints
    )
    try:
      self.step, self.state = self._restore(built)
    except BaseException:
      self.ckpt.close()
      raise
    # Only now, after the compatibility check: config.json describes the
    # checkpoints in the workdir.
    if jax.process_index() == 0:
      storage.write_text(
        storage.join(workdir, 'config.json'), config.to_json(indent=2)
      )
    self.last_saved = self.step if self.step > 0 else None
    self.skipped = pipeline.SkippedFiles(source)
    self.writer = metrics_lib.MetricWriter(workdir, resume_step=self.step)
    # The data position is the step: batch k is fixed by the config.
    self.reader = interrupt.Reader(
      iter(
        pipeline.train_dataset(
          source,
          batch_size=config.batch_size,
          rows=parallel.process_rows(self.mesh, config.batch_size),
          canvas_size=config.data.canvas_size,
          seed=config.seed,
          num_workers=config.data.num_workers,
          start_batch=self.step,
        )
      )
    )
    self.progress = metrics_lib.Progress(
      self.step, total_steps, config.batch_size
    )
    self.scalars = {}  # the last metrics fetched
    self.metrics = self.in_flight = None  # the last two steps' (on device)
    self.pending = None  # the next batch, read ahead
    self._closed = False

  def _restore(self, built):
    """(step, state): the newest intact checkpoint's, or step 0's."""
    abstract = checkpoint_lib.abstract_like(
      built.state_shape, built.state_sharding
    )

    def config_for(saved: dict):
      checkpoint_lib.check_compatible(saved, self.config, self.workdir)
      return self.config

    restored = workdir_lib.restore_newest(
      self.ckpt, config_for, self.mesh, abstract
    )
    if restored is not None:
      step, _, _, state = restored
      logger.info('resuming from step %d in %s', step, self.workdir)
      return step, state
    init = jax.jit(built.init_fn, out_shardings=built.state_sharding)
    return 0, init()

  def run(self) -> dict:
    """Trains to ``total_steps``, evaluates; the result metrics."""
    from dino_jax.evaluation import (
      run as eval_run,  # the eval imports are heavier
    )

    total_steps = self.total_steps
    try:
      if eval_run.missing(self.config, self.writer, self.step, total_steps):
        # A signal stopped this step's evaluation after the step was saved:
        # evaluate it now, or its point of the learning curve is lost.
        logger.info(
          'step %d was saved before its evaluation: evaluating', self.step
        )
        self._evaluate_and_write(final=False)
      while self.step < total_steps:
        if self._stop_requested():
          return self._save_and_exit()
        self._train_one_step()
      if self._stop_requested():  # came during the last step
        return self._save_and_exit()
      return self._finish()
    except KeyboardInterrupt:
      # A second Ctrl-C: no save, but nothing left behind: the data workers
      # stop (their batches' shared memory freed), the last step dispatched
      # (holding its input) ends. A save in flight stays unfinished (Orbax
      # never restores its temporary directory).
      self.reader.close(wait=2.0)
      self.writer.close()
      if self.in_flight is not None:
        jax.block_until_ready(self.in_flight)
      raise
    except Exception:
      self._close()  # the last good save completes
      raise

  def _stop_requested(self) -> bool:
    """Whether to save and stop now; the same answer on every process."""
    interrupt.raise_if_aborted()
    if jax.process_count() > 1:
      # SIGTERM reached JAX's preemption notifier (a Ctrl-C is forwarded to
      # it by the shell): every process answers True at the same step.
      return self.ckpt.manager.reached_preemption(self.step)
    return interrupt.requested() is not None

  def _train_one_step(self) -> None:
    """Dispatches one step (after its batch), then logs, saves, evaluates."""
    if self.pending is None:  # the first step, or the read ahead stopped
      self.pending = self._read_batch()
      if self.pending is None:
        return  # a signal came during the wait: the loop's top saves
    skipped_rows, batch = self.pending
    self.pending = None
    self.skipped.update(skipped_rows)
    self.state, self.metrics = self.jitted(self.state, batch)
    self.step += 1
    # Double buffering: the next batch is read and its transfer to the
    # devices started while this step runs. (A signal meanwhile: the loop's
    # top saves; the read ahead is dropped, as the data position is the
    # step.)
    if self.step < self.total_steps:
      self.pending = self._read_batch()
    # At most one step queued behind the running one: without this wait,
    # async dispatch let the loop run up to log_every_steps ahead of the
    # device, and a signal's save waited for all of them (demo on one core:
    # signal at step 61, saved step 74 after 20 s).
    if self.in_flight is not None:
      jax.block_until_ready(self.in_flight)
    self.in_flight = self.metrics
    c, step = self.config, self.step
    last = step == self.total_steps
    log_now = step % c.log_every_steps == 0 or last
    save_now = step % c.checkpoint_every_steps == 0 or last
    if log_now or save_now:
      self.scalars = self._fetch_checked()
    if log_now:
      self._log()
    if save_now:
      self.ckpt.save(step, self.state, c)
      self.last_saved = step
    if c.eval_every_steps > 0 and step % c.eval_every_steps == 0 and not last:
      self._evaluate_and_write(final=False)

  def _read_batch(self):
    """(skipped, global batch), its transfer to the devices started; None
    when a signal stopped the wait (or, after a signal, the input pipeline
    failed: a worker killed with the process group)."""
    try:
      local = self.reader.next()
    except interrupt.Stopped:
      return None
    except Exception:
      if interrupt.requested() is None:
        raise
      logger.warning('input pipeline stopped after the signal', exc_info=1)
      return None  # the state is whole: the loop's top saves it
    skipped = local.pop('skipped')
    return skipped, pipeline.global_batch(self.mesh, local)

  def _fetch_checked(self) -> dict:
    """Metrics of the last step as floats; raises if the state is bad."""
    values = {k: float(v) for k, v in jax.device_get(self.metrics).items()}
    warnings = metrics_lib.check_health(
      self.step, values, self.config.model.out_dim, self.last_saved
    )
    for warning in warnings:
      logger.warning('step %d: %s', self.step, warning)
    return values

  def _log(self) -> None:
    s = self.scalars
    s.update(self.progress.update(self.step))
    s['epoch'] = self.step / self.steps_per_epoch
    s['skipped_images'] = len(self.skipped.seen)
    self.writer.write(self.step, s)
    logger.info('%s', metrics_lib.progress_line(self.step, self.total_steps, s))

  def _save_and_exit(self) -> dict:
    """After a signal: saves the last step done (unless saved), exits."""
    name = interrupt.requested() or 'SIGTERM'  # else JAX's notifier's
    if self.last_saved != self.step and self.metrics is not None:
      self.scalars = self._fetch_checked()
      interrupt.raise_if_aborted()  # a second Ctrl-C meanwhile
      self.ckpt.save(self.step, self.state, self.config)
      self.last_saved = self.step
    logger.warning(
      '%s: %s, exiting; rerun the same command to resume',
      name if interrupt.requested() else 'preemption notice',
      f'saved step {self.last_saved} in {self.workdir}'
      if self.last_saved is not None
      else 'no step done yet, nothing to save',
    )
    self._close()
    return {**self.scalars, 'stopped_by': name}

  def _finish(self) -> dict:
    """The last step is saved: the final evaluation, then the result."""
    from dino_jax.evaluation import run as eval_run

    self._close(writer=False)
    try:
      results = self._evaluate(final=True)
      if results is None:
        logger.warning(
          '%s: stopped the evaluation, exiting; step %d is saved in %s; '
          'rerun the same command to evaluate',
          interrupt.requested(),
          self.step,
          self.workdir,
        )
        return {**self.scalars, 'stopped_by': interrupt.requested()}
      self.writer.write(self.step, eval_run.knn_scalars(results), replace=True)
    finally:
      self.writer.close()
    return {**self.scalars, **results}

  def _evaluate_and_write(self, final: bool) -> None:
    from dino_jax.evaluation import run as eval_run

    results = self._evaluate(final)
    if results is not None:  # else stopped: the loop's top saves
      self.writer.write(self.step, eval_run.knn_scalars(results))

  def _evaluate(self, final: bool) -> dict | None:
    """The evaluations of this step, or None when a signal stopped them."""
    from dino_jax.evaluation import run as eval_run

    return eval_run.during_training(
      self.config, self.workdir, self.mesh, self.state, self.step, final
    )

  def _close(self, writer: bool = True) -> None:
    if not self._closed:  # the save first, then the data workers
      self._closed = True
      # A second Ctrl-C: no wait.
      self.ckpt.wait(poll=interrupt.raise_if_aborted)
      self.ckpt.close()
    self.reader.close()  # stops grain's decode threads
    if writer:
      self.writer.close()
