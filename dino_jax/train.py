"""The training loop: mesh, data, state, resume, step, log, eval, checkpoint.

No math here: the step is ``step.make_train_step``, the augmentation
``data.multicrop``, the evaluations ``evaluation.run``. The shell records
signals (``cli/signals.py``); the loop polls the record (``interrupt``):

- SIGTERM or a first Ctrl-C: the top of the next step saves the last step
  done and returns ``stopped_by`` (a wait for data or an evaluation stops
  early; a stopped evaluation is done first by the next run).
- A second Ctrl-C: KeyboardInterrupt where the loop next polls; no save.
- SIGKILL: the next run resumes from the newest intact checkpoint.
- Several processes: all stop at the same step, Orbax's
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
from dino_jax.evaluation import run as eval_run

logger = logging.getLogger(__name__)


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  hold: Callable[[str], contextlib.AbstractContextManager] | None = None,
) -> dict:
  """Trains (resuming from ``workdir``: a local directory or a URL, created
  by process 0), evaluates, returns the last metrics; after a SIGTERM or
  Ctrl-C (recorded by the shell) with ``stopped_by``, the signal's name.
  ``hold(workdir)``: a context manager process 0 holds for the whole run
  (the shell's one-run-per-workdir lock, ``cli.lock.lock``), or None.
  """
  config_lib.validate(config, jax.device_count())
  for line in config_lib.advice(config):
    logger.warning('%s', line)
  workdir_lib.check_path(workdir)
  source = sources.make_source(config.data)
  logger.info('data: %r (%d images)', source, len(source))
  steps_per_epoch, total_steps = config_lib.steps_of(config, len(source))
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
    for line in metrics_lib.plan_lines(
      config, self.mesh, steps_per_epoch, total_steps
    ):
      logger.info('%s', line)
    built = step_lib.build_sharded_step(config, self.mesh, steps_per_epoch)
    self.jitted = built.jitted
    self.ckpt = checkpoint_lib.Checkpointer(
      storage.join(workdir, 'checkpoints'), keep=config.keep_checkpoints
    )
    try:
      self.step, self.state = workdir_lib.restore_or_init(
        self.ckpt, config, workdir, self.mesh, built
      )
    except BaseException:
      self.ckpt.close()
      raise
    workdir_lib.write_config(workdir, config)  # after the check: theirs
    self.last_saved = self.step if self.step > 0 else None
    self.skipped = pipeline.SkippedFiles(source)
    self.writer = metrics_lib.MetricWriter(workdir, resume_step=self.step)
    self.feed = pipeline.TrainFeed(source, config, self.mesh, self.step)
    self.progress = metrics_lib.Progress(
      self.step, total_steps, config.batch_size
    )
    self.scalars = {}  # the last metrics fetched
    self.metrics = self.in_flight = None  # the last two steps' (on device)
    self._closed = False

  def run(self) -> dict:
    """Trains to ``total_steps``, evaluates; the result metrics."""
    try:
      if eval_run.missing(
        self.config, self.writer, self.step, self.total_steps
      ):
        # A signal stopped this step's evaluation after the step was saved:
        # evaluate it now, or its point of the learning curve is lost.
        logger.info(
          'step %d was saved before its evaluation: evaluating', self.step
        )
        self._evaluate_and_write(final=False)
      while self.step < self.total_steps:
        if self._stop_requested():
          return self._save_and_exit()
        self._train_one_step()
      if self._stop_requested():  # came during the last step
        return self._save_and_exit()
      return self._finish()
    except KeyboardInterrupt:
      # A second Ctrl-C: no save, but nothing left behind: the data threads
      # stop, the last step dispatched (holding its input) ends. A save in
      # flight stays unfinished (Orbax never restores its temporary folder).
      self.feed.close(wait=2.0)
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
    taken = self.feed.take()
    if taken is None:
      return  # a signal came during the wait: the loop's top saves
    skipped_rows, batch = taken
    self.skipped.update(skipped_rows)
    self.state, self.metrics = self.jitted(self.state, batch)
    self.step += 1
    # Double buffering: the next batch is read and sent while this step
    # runs (after a signal the loop's top saves; the read ahead is dropped,
    # as the data position is the step).
    if self.step < self.total_steps:
      self.feed.read_ahead()
    # At most one step queued behind the running one: else a signal's save
    # waits for up to log_every_steps queued steps.
    if self.in_flight is not None:
      jax.block_until_ready(self.in_flight)
    self.in_flight = self.metrics
    c, step = self.config, self.step
    last = step == self.total_steps
    log_now = step % c.log_every_steps == 0 or last
    save_now = step % c.checkpoint_every_steps == 0 or last
    if log_now or save_now:
      self._fetch()
    if log_now:
      s = self.scalars
      s.update(self.progress.update(step))
      s['epoch'] = step / self.steps_per_epoch
      s['skipped_images'] = len(self.skipped.seen)
      self.writer.write(step, s)
      logger.info('%s', metrics_lib.progress_line(step, self.total_steps, s))
    if save_now:
      self.ckpt.save(step, self.state, c)
      self.last_saved = step
    if c.eval_every_steps > 0 and step % c.eval_every_steps == 0 and not last:
      self._evaluate_and_write(final=False)

  def _fetch(self) -> None:
    self.scalars = metrics_lib.fetch_checked(
      self.metrics, self.step, self.config.model.out_dim, self.last_saved
    )

  def _save_and_exit(self) -> dict:
    """After a signal: saves the last step done (unless saved), exits."""
    name = interrupt.requested() or 'SIGTERM'  # else JAX's notifier's
    if self.last_saved != self.step and self.metrics is not None:
      self._fetch()
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
    self._close(writer=False)
    try:
      results = self._evaluate_and_write(final=True)
      if results is None:
        logger.warning(
          '%s: stopped the evaluation, exiting; step %d is saved in %s; '
          'rerun the same command to evaluate',
          interrupt.requested(),
          self.step,
          self.workdir,
        )
        return {**self.scalars, 'stopped_by': interrupt.requested()}
    finally:
      self.writer.close()
    return {**self.scalars, **results}

  def _evaluate_and_write(self, final: bool) -> dict | None:
    """The evaluations of this step, their row written (the final one
    replaces the step's row of a finished run evaluated again); None when
    a signal stopped them (the loop's top saves)."""
    results = eval_run.during_training(
      self.config, self.workdir, self.mesh, self.state, self.step, final
    )
    if results is not None:
      scalars = eval_run.knn_scalars(results)
      self.writer.write(self.step, scalars, replace=final)
    return results

  def _close(self, writer: bool = True) -> None:
    if not self._closed:  # the save first, then the data threads
      self._closed = True
      # A second Ctrl-C: no wait.
      self.ckpt.wait(poll=interrupt.raise_if_aborted)
      self.ckpt.close()
    self.feed.close()  # stops grain's decode threads
    if writer:
      self.writer.close()
