"""dino_jax.main end to end: outputs, exact resume, SIGTERM, errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from absl import flags
from absl.testing import absltest
from ml_collections import config_flags
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'tiny_config.py')


def env(devices: int = 1):
  e = dict(os.environ)
  # The suite's XLA flags (conftest), then this run's device count.
  e['XLA_FLAGS'] = (
    f'{e.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={devices}'
  )
  e['JAX_PLATFORMS'] = 'cpu'
  e['PYTHONPATH'] = ROOT + os.pathsep + e.get('PYTHONPATH', '')
  # Half the compile time of the tiny model (flax's imagenet test does the
  # same); every run of a test compiles alike, so losses stay comparable.
  e['JAX_DISABLE_MOST_OPTIMIZATIONS'] = 'true'
  return e


def command(workdir, *overrides, config=TINY):
  return [
    sys.executable,
    '-m',
    'dino_jax.main',
    f'--config={config}',
    f'--workdir={workdir}',
    *overrides,
  ]


def helper_command(script, workdir, *overrides):
  """``command`` run by a helper in tests/ that patches ``dino_jax.main``."""
  return [
    sys.executable,
    os.path.join(ROOT, 'tests', script),
    *command(workdir, *overrides)[3:],  # after python -m dino_jax.main
  ]


def run(workdir, *overrides, devices=1, config=TINY, timeout=600):
  return subprocess.run(
    command(workdir, *overrides, config=config),
    env=env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=ROOT,
  )


def start(workdir, *overrides, stderr=subprocess.PIPE):
  """The training CLI in the background, in its own process group (as a
  terminal or a scheduler starts it); stderr captured as text, or written
  to the open file ``stderr``."""
  return start_command(command(workdir, *overrides), stderr=stderr)


def start_command(argv, stderr=subprocess.PIPE, environ=None):
  """``argv`` in the background, in its own process group; see ``start``.

  ``environ``: variables added to the test environment."""
  return subprocess.Popen(
    argv,
    env={**env(), **(environ or {})},
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=stderr,
    text=True,
    start_new_session=True,
  )


def group_exited(pgid):
  """No process of the group is left, zombies aside (data workers too)."""
  for entry in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{entry}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
      continue
    if int(fields[2]) == pgid and fields[0] != 'Z':  # state, ppid, pgrp
      return False
  return True


def read_metrics(workdir, evaluations=False):
  """Training rows of metrics.jsonl (or, with evaluations, k-NN rows)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if ('loss' in r) != evaluations]


def metrics_path(workdir):
  return os.path.join(workdir, 'metrics.jsonl')


def read_text(path):
  try:
    with open(path) as f:
      return f.read()
  except FileNotFoundError:
    return ''


def wait_for(condition, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    if time.time() > deadline:
      raise TimeoutError('condition not met in time')
    time.sleep(0.05)


def checkpoints(workdir):
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


class ConfigTest(absltest.TestCase):
  def parse(self, *args):
    values = flags.FlagValues()
    argv = ['prog', *args]  # overrides are read from argv, not sys.argv
    config_flags.DEFINE_config_file(
      'config', None, flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config

  def test_overrides_and_variants(self):
    config = self.parse(
      f'--config={ROOT}/configs/vit_s16.py',
      '--config.optim.lr=0.001',
      '--config.model.depth=6',
    )
    self.assertEqual(config.optim.lr, 0.001)
    self.assertEqual(config.model.depth, 6)
    self.assertEqual(config.batch_size, 1024)
    self.assertEqual(config.model.out_dim, 65536)
    smoke = self.parse(f'--config={ROOT}/configs/vit_s16.py:smoke')
    self.assertEqual(smoke.data.source, 'synthetic')
    b16 = self.parse(f'--config={ROOT}/configs/vit_b16.py')
    self.assertEqual(b16.model.arch, 'vit_base')
    self.assertEqual(b16.optim.clip_grad, 0.3)

  def test_fashion_mnist_variants_validate(self):
    from dino_jax import config as config_lib

    seen = {}
    for variant in ('', ':cpu', ':gpu', ':parity'):
      config = self.parse(f'--config={ROOT}/configs/fashion_mnist.py{variant}')
      config_lib.validate(config)
      seen[variant] = (config.model.patch_size, config.batch_size)
    self.assertEqual(seen[''], seen[':cpu'])
    self.assertEqual(seen[':gpu'], (4, 512))
    self.assertEqual(seen[':parity'], (4, 128))
    with self.assertRaisesRegex(Exception, "'tpu' unknown"):
      self.parse(f'--config={ROOT}/configs/fashion_mnist.py:tpu')

  def test_unknown_field_rejected(self):
    with self.assertRaisesRegex(AttributeError, 'Did you mean "lr"'):
      self.parse(f'--config={ROOT}/configs/vit_s16.py', '--config.optim.lrr=1')


@pytest.mark.slow
class EndToEndTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    # One uninterrupted 8-step run (with evaluation) serves as the reference
    # for the tests below; its executables land in the session's compilation
    # cache, so the later runs of the same config start quickly.
    super().setUpClass()
    cls.reference = tempfile.mkdtemp(prefix='dino_jax_reference_')
    cls.result = run(
      cls.reference,
      '--config.total_steps=8',
      '--config.eval_every_steps=4',
      '--config.eval.baselines=True',
      '--config.eval.attention_size=24',  # k-NN at 32 px
    )

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.reference, ignore_errors=True)
    super().tearDownClass()

  def test_train_writes_metrics_checkpoints_and_eval(self):
    workdir, result = self.reference, self.result
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    rows = read_metrics(workdir)
    self.assertEqual([r['step'] for r in rows], list(range(1, 9)))
    for key in (
      'loss',
      'lr',
      'wd',
      'momentum',
      'teacher_temp',
      'teacher_entropy',
      'images_per_sec',
      'eta_sec',
    ):
      self.assertIn(key, rows[-1])
    self.assertEqual(rows[0]['lr'], 0.0)
    self.assertEqual(checkpoints(workdir), [4, 6, 8])  # keep_checkpoints 3
    with open(os.path.join(workdir, 'eval', 'knn.json')) as f:
      knn = json.load(f)
    self.assertEqual(knn['step'], 8)
    self.assertEqual(set(knn['trained']), {'2', '4'})
    # The learning curve: one k-NN row per evaluation (eval_every_steps=4 and
    # the end), the last one equal to knn.json; the baselines (constant) are
    # scored only at the end.
    curve = read_metrics(workdir, evaluations=True)
    self.assertEqual([r['step'] for r in curve], [4, 8])
    self.assertEqual(
      set(curve[0]), {'step', 'knn_trained_k2', 'knn_trained_k4'}
    )
    for name in ('trained', 'random_init', 'raw_pixels'):
      self.assertEqual(curve[1][f'knn_{name}_k4'], knn[name]['4']['top1'])
    self.assertEqual(result.stdout.count('k-NN raw_pixels'), 1)
    png = os.path.join(self.create_tempdir().full_path, 'curve.png')
    plot = subprocess.run(
      [
        sys.executable,
        '-m',
        'dino_jax.plot',
        f'--workdir={workdir}',
        f'--out={png}',
        '--k=4',
      ],
      capture_output=True,
      text=True,
      cwd=ROOT,
      env=env(),
      timeout=120,
    )
    self.assertEqual(plot.returncode, 0, plot.stderr[-2000:])
    with Image.open(png) as image:
      self.assertEqual(image.size, (640, 560))
    self.assertTrue(os.listdir(os.path.join(workdir, 'tensorboard')))
    attention = os.listdir(os.path.join(workdir, 'eval', 'attention'))
    self.assertIn('test0-overview.png', attention)
    head = os.path.join(workdir, 'eval', 'attention', 'test0-head0.png')
    with Image.open(head) as image:
      self.assertEqual(image.size, (24, 24))  # eval.attention_size
    self.assertIn('k-NN trained', result.stdout)

  def test_sigkill_resume_is_exact(self):
    """SIGKILL to the whole group (a scheduler's last word), data workers
    too: the run resumes bit-identically and leaves nothing in shared
    memory (the data is decoded on threads: none is made)."""
    self.assertEqual(self.result.returncode, 0, self.result.stderr[-3000:])
    expected = {r['step']: r['loss'] for r in read_metrics(self.reference)}
    self.assertLen(expected, 8)

    def segments():
      return {n for n in os.listdir('/dev/shm') if n.startswith('psm_')}

    before = segments()
    workdir = self.create_tempdir().full_path
    proc = start(
      workdir,
      '--config.total_steps=8',
      '--config.eval.knn=False',
      '--config.eval.attention_images=0',
      '--config.data.num_workers=2',
      stderr=subprocess.DEVNULL,
    )
    wait_for(
      lambda: (
        os.path.exists(metrics_path(workdir))
        and len(read_metrics(workdir)) >= 5
      )
    )
    during = segments() - before  # (other programs' too, on a shared host)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: group_exited(proc.pid), timeout=30)
    # Segments seen during the run are not the workers': gone by now.
    deadline = time.time() + 20
    while segments() & during and time.time() < deadline:
      time.sleep(0.1)
    self.assertEmpty(segments() & during)
    self.assertTrue(checkpoints(workdir))
    resumed_from = max(checkpoints(workdir))
    self.assertLess(resumed_from, 8)
    with open(metrics_path(workdir), 'a') as f:
      f.write('{"step": 7, "lo')  # as if the kill came mid-line
    result = run(
      workdir,
      '--config.total_steps=8',
      '--config.eval.knn=False',
      '--config.eval.attention_images=0',
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn(f'resuming from step {resumed_from}', result.stderr)
    rows = read_metrics(workdir)
    self.assertEqual([r['step'] for r in rows], list(range(1, 9)))
    for row in rows:  # bit-identical on CPU, before and after the kill
      self.assertEqual(row['loss'], expected[row['step']], row['step'])

  def test_rerun_of_a_finished_run_evaluates_it_once_more(self):
    # The same command again on a finished run: no step, the last step
    # evaluated again, its row replaced (before: a second row for step 8).
    self.assertEqual(self.result.returncode, 0, self.result.stderr[-3000:])
    workdir = os.path.join(self.create_tempdir().full_path, 'work')
    shutil.copytree(self.reference, workdir)
    result = run(
      workdir,
      '--config.total_steps=8',
      '--config.eval_every_steps=4',
      '--config.eval.baselines=True',
      '--config.eval.attention_size=24',
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('resuming from step 8', result.stderr)
    self.assertNotIn('step 8/8 ', result.stderr)  # nothing trained
    self.assertEqual(read_metrics(workdir), read_metrics(self.reference))
    evaluations = read_metrics(workdir, evaluations=True)
    self.assertEqual([r['step'] for r in evaluations], [4, 8])
    self.assertEqual(
      evaluations, read_metrics(self.reference, evaluations=True)
    )

  def test_second_ctrl_c_exits_at_once_and_stops_the_workers(self):
    # (In this class, not run beside the SIGKILL test: its workers' batches
    # sit in /dev/shm for a while, which that test would count as leaked.)
    # Ctrl-C twice from a terminal (SIGINT to the group) while the device is
    # busy: exit 130 at once, no save, no traceback, the data workers stopped
    # by the run. Before, the interrupt unwound past the data workers: their
    # buffered batches were left to the resource tracker (freed at exit with
    # "There appear to be 19 leaked shared_memory objects"), and once the
    # interpreter's teardown crashed (SIGSEGV).
    workdir = self.create_tempdir().full_path
    log = os.path.join(workdir, 'stderr.txt')
    argv = helper_command(
      'slow_step_main.py',
      workdir,
      '--config.epochs=3',
      '--config.checkpoint_every_steps=1000',
      '--config.data.num_workers=2',
      '--config.eval.knn=False',
      '--config.eval.attention_images=0',
    )
    with open(log, 'w') as stderr:
      proc = start_command(
        argv, stderr=stderr, environ={'SLOW_STEP_MATMULS': '400'}
      )
    wait_for(lambda: 'step 2/24 ' in read_text(log))
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.3)  # the first one's save waits for the busy device
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    text = read_text(log)
    self.assertEqual(proc.returncode, 130, text[-3000:])
    self.assertIn('\ninterrupted\n', text)
    for bad in ('Traceback', 'Fatal Python error', 'terminated unexpectedly'):
      self.assertNotIn(bad, text)
    wait_for(lambda: group_exited(proc.pid), timeout=30)
    time.sleep(2)  # the tracker (own session) writes its warning at the exit
    # The workers' batches are freed by the run itself, none left to the
    # resource tracker (which would free them with this warning).
    self.assertNotIn('leaked', read_text(log))

  def test_refused_resume_keeps_config_json(self):
    self.assertEqual(self.result.returncode, 0, self.result.stderr[-3000:])
    workdir = os.path.join(self.create_tempdir().full_path, 'work')
    shutil.copytree(self.reference, workdir)
    with open(os.path.join(workdir, 'config.json')) as f:
      before = f.read()
    result = run(
      workdir,
      '--config.total_steps=10',
      '--config.model.embed_dim=48',
      '--config.batch_size=16',
      '--config.data.num_workers=3',  # may change: not listed below
    )
    self.assertEqual(result.returncode, 1, result.stderr[-2000:])
    errors = [x for x in result.stderr.splitlines() if x.startswith('error:')]
    self.assertLen(errors, 1)
    self.assertRegex(
      errors[0],
      r'holds a checkpoint of another recipe: batch_size \(checkpoint 8, '
      r'now 16\), model.embed_dim \(checkpoint 32, now 48\)\. Resume with',
    )
    self.assertNotIn('num_workers', errors[0])
    self.assertNotIn('Traceback', result.stderr, result.stderr[-6000:])
    with open(os.path.join(workdir, 'config.json')) as f:
      self.assertEqual(f.read(), before)  # still describes the checkpoints

  def test_damaged_checkpoints_are_skipped_and_kept(self):
    self.assertEqual(self.result.returncode, 0, self.result.stderr[-3000:])
    expected = {r['step']: r['loss'] for r in read_metrics(self.reference)}
    workdir = os.path.join(self.create_tempdir().full_path, 'work')
    shutil.copytree(self.reference, workdir)
    ckpts = os.path.join(workdir, 'checkpoints')
    # Step 8: every data file of the state truncated to half.
    truncated = 0
    for dirpath, _, names in os.walk(os.path.join(ckpts, '8', 'state')):
      for name in names:
        path = os.path.join(dirpath, name)
        if 'ocdbt' in dirpath or name.startswith('d'):
          with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 2)
          truncated += 1
    self.assertGreater(truncated, 0)
    # Step 6: the config item's file removed.
    shutil.rmtree(os.path.join(ckpts, '6', 'config'))
    result = run(
      workdir,
      '--config.total_steps=8',
      '--config.eval.knn=False',
      '--config.eval.attention_images=0',
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertNotIn('Traceback', result.stderr, result.stderr[-6000:])
    self.assertRegex(result.stderr, r'checkpoint 8 in .* is damaged')
    self.assertRegex(result.stderr, r'checkpoint 6 in .* is damaged')
    self.assertIn('resuming from step 4', result.stderr)
    damaged = os.path.join(workdir, 'damaged_checkpoints')
    self.assertEqual(sorted(os.listdir(damaged)), ['6', '8'])  # kept
    self.assertEqual(checkpoints(workdir), [4, 6, 8])  # new 6 and 8
    for row in read_metrics(workdir):  # steps 5-8 trained again, exactly
      self.assertEqual(row['loss'], expected[row['step']], row['step'])

  def test_ctrl_c_lock_and_resume_with_other_workers(self):
    # Ctrl-C to the process group of a run with 2 data workers and slow
    # storage: it saves the step it reached and exits 130, with no
    # traceback from the workers; meanwhile a second run on the workdir is
    # refused; resuming with other worker counts reproduces every loss.
    self.assertEqual(self.result.returncode, 0, self.result.stderr[-3000:])
    expected = {r['step']: r['loss'] for r in read_metrics(self.reference)}
    workdir = self.create_tempdir().full_path
    args = ('--config.eval.knn=False', '--config.eval.attention_images=0')
    proc = start(
      workdir,
      '--config.total_steps=8',
      '--config.checkpoint_every_steps=1000',
      '--config.data.num_workers=2',
      # Per image read: 2.4 s a batch a worker. The workers' buffers fill
      # during the compile; slower reads leave steps to stop after them
      # (at 0.3 a loaded 2-core CI ran all 8 steps before the Ctrl-C).
      '--config.data.synthetic_delay=0.6',
      *args,
    )
    lock = os.path.join(workdir, 'lock')
    wait_for(lambda: str(proc.pid) in read_text(lock))
    second = run(workdir, '--config.total_steps=8', *args)
    self.assertEqual(second.returncode, 1, second.stderr[-2000:])
    self.assertIn(
      f'error: --workdir={workdir} is in use by pid {proc.pid}', second.stderr
    )
    wait_for(lambda: len(read_text(metrics_path(workdir)).splitlines()) >= 2)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    self.assertEqual(proc.returncode, 130, stderr[-3000:])
    for text in ('Traceback', 'KeyboardInterrupt', 'leaked'):
      self.assertNotIn(text, stderr)
    saved = checkpoints(workdir)
    self.assertEqual(saved, [read_metrics(workdir)[-1]['step']])
    self.assertLess(saved[0], 8)
    result = run(
      workdir, '--config.total_steps=8', '--config.data.num_workers=1', *args
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertNotIn('leaked', result.stderr)
    rows = read_metrics(workdir)
    self.assertEqual([r['step'] for r in rows], list(range(1, 9)))
    for row in rows:  # batch k does not depend on the worker count
      self.assertEqual(row['loss'], expected[row['step']], row['step'])


@pytest.mark.slow
class SignalTest(absltest.TestCase):
  def test_sigterm_to_group_while_waiting_for_data(self):
    workdir = self.create_tempdir().full_path
    proc = start(
      workdir,
      # 16 steps (the reference's schedule, so its executable is reused):
      # the workers buffer a few batches during the compile, then deliver
      # about one a second; the signal cannot land after the last step.
      '--config.checkpoint_every_steps=1000',
      '--config.data.num_workers=2',
      # The loop spends most of its time waiting for the workers.
      '--config.data.synthetic_delay=0.5',
    )
    wait_for(lambda: len(read_text(metrics_path(workdir)).splitlines()) >= 2)
    time.sleep(0.5)  # inside the wait for the next batch
    os.killpg(proc.pid, signal.SIGTERM)  # as SLURM and `timeout` do
    _, stderr = proc.communicate(timeout=300)
    self.assertEqual(proc.returncode, 0, stderr[-3000:])
    last_logged = read_metrics(workdir)[-1]['step']
    self.assertEqual(checkpoints(workdir), [last_logged])
    self.assertIn(f'SIGTERM: saved step {last_logged}', stderr)
    for text in ('Traceback', 'terminated unexpectedly', 'leaked'):
      self.assertNotIn(text, stderr)

  def test_sigterm_saves_the_step_the_device_reached(self):
    # A device slower than the input pipeline (each step here ~0.5 s on a
    # 2-core VM, the data ~0.03 s): the save after SIGTERM must not wait for
    # steps the loop queued ahead of the device (async dispatch). Before the
    # bound on steps in flight, the loop queued up to the next log step
    # within 0.4 s of a log, and this test's save came at step 32, 16 steps
    # after the signal.
    workdir = self.create_tempdir().full_path
    log = os.path.join(workdir, 'stderr.txt')
    argv = helper_command(
      'slow_step_main.py',
      workdir,
      '--config.epochs=6',  # 48 steps
      '--config.log_every_steps=16',
      '--config.checkpoint_every_steps=1000',
      '--config.eval.knn=False',
      '--config.eval.attention_images=0',
    )
    with open(log, 'w') as stderr:
      proc = start_command(
        argv, stderr=stderr, environ={'SLOW_STEP_MATMULS': '50'}
      )
    wait_for(lambda: 'step 16/48 ' in read_text(log))
    time.sleep(1.0)  # the loop has queued steps, the device runs 1-3 of them
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=300)
    text = read_text(log)
    self.assertEqual(proc.returncode, 0, text[-3000:])
    saved = checkpoints(workdir)
    self.assertLen(saved, 1)
    # Before the fix: step 32 (the loop blocks on the log step's metrics).
    # Now the step the device reached, a few after 16; 28 would take a device
    # running the 13 GFLOP step in 80 ms.
    self.assertBetween(saved[0], 17, 28)
    self.assertIn(f'SIGTERM: saved step {saved[0]} in {workdir}', text)
    self.assertIn(
      'SIGTERM: saving at the next step boundary, then exiting\n', text
    )
    self.assertNotIn('Ctrl-C', text)  # a second SIGTERM does not stop it

  def test_ctrl_c_at_startup_is_never_lost(self):
    # A Ctrl-C while the run restores, starts its workers or compiles stops
    # it before the first step. Before, Python's KeyboardInterrupt could be
    # raised inside a gc callback, which swallows it: the run trained on.
    workdir = self.create_tempdir().full_path
    result = subprocess.run(
      helper_command(
        'gc_signal_main.py',
        workdir,
        '--config.data.num_workers=2',
      ),
      env=env(),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
    )
    self.assertEqual(result.returncode, 130, result.stderr[-3000:])
    self.assertIn(
      'SIGINT: no step done yet, nothing to save, exiting', result.stderr
    )
    self.assertNotIn('step 1/', result.stderr)
    self.assertNotIn('Traceback', result.stderr, result.stderr[-6000:])
    self.assertFalse(os.path.exists(os.path.join(workdir, 'checkpoints', '1')))

  def test_sigterm_lost_in_a_gc_callback_still_stops_a_stalled_wait(self):
    # SIGTERM while the loop waits for data, its handler running inside a
    # gc callback; then the pipeline stalls for 120 s. The run must save
    # within seconds anyway. Before handlers only recorded: the handler's
    # exception, swallowed by Python there ("Exception ignored in ...
    # _StopWaiting"), had to be raised again by a SIGALRM; now the wait
    # polls the record (interrupt.Reader).
    workdir = self.create_tempdir().full_path
    argv = helper_command(
      'gc_signal_main.py',
      workdir,
      '--config.checkpoint_every_steps=1000',
    )
    began = time.time()
    result = subprocess.run(
      argv,
      env={**env(), 'GC_SIGNAL': 'wait'},
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
    )
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertLess(time.time() - began, 90)  # the stall alone is 120 s
    self.assertIn(f'SIGTERM: saved step 2 in {workdir}', result.stderr)
    self.assertNotIn('Exception ignored', result.stderr)
    self.assertEqual(checkpoints(workdir), [2])

  def test_sigterm_to_group_during_evaluations(self):
    # A signal during an eval_every_steps evaluation saves the step it
    # reached (its data workers, starting then, must not die of it); one
    # during the final evaluation exits with the last step saved, and the
    # same command evaluates it. No data worker outlives the run.
    workdir = self.create_tempdir().full_path
    args = (
      '--config.total_steps=16',
      '--config.checkpoint_every_steps=1000',
      '--config.eval_every_steps=8',
      '--config.eval.attention_images=0',
      '--config.data.num_workers=2',
      '--config.data.synthetic_delay=0.05',
    )
    log = os.path.join(workdir, 'stderr.txt')

    def stop_in_evaluation(step):
      with open(log, 'w') as stderr:
        proc = start(workdir, *args, stderr=stderr)
        wait_for(lambda: f'step {step}/16 ' in read_text(log))
        time.sleep(1.0)  # the evaluation is starting its data workers
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
      text = read_text(log)
      self.assertEqual(proc.returncode, 0, text[-3000:])
      wait_for(lambda: group_exited(proc.pid), timeout=10)  # none outlives
      for bad in ('Traceback', 'terminated unexpectedly', 'leaked'):
        self.assertNotIn(bad, text)
      return text

    text = stop_in_evaluation(8)
    self.assertIn(f'SIGTERM: saved step 8 in {workdir}', text)
    self.assertNotIn('k-NN trained', text)  # stopped before its table
    self.assertEqual(checkpoints(workdir), [8])
    text = stop_in_evaluation(16)
    self.assertIn('resuming from step 8', text)
    # The evaluation the signal stopped is done first: no point of the
    # learning curve is lost (before: none for step 8).
    self.assertIn('step 8 was saved before its evaluation: evaluating', text)
    self.assertIn(
      f'SIGTERM: stopped the evaluation, exiting; step 16 is saved in '
      f'{workdir}; rerun the same command to evaluate',
      text,
    )
    self.assertEqual(checkpoints(workdir), [8, 16])
    result = run(workdir, *args)
    self.assertEqual(result.returncode, 0, result.stderr[-3000:])
    self.assertIn('resuming from step 16', result.stderr)
    self.assertIn('k-NN trained (step 16)', result.stdout + result.stderr)
    steps = [r['step'] for r in read_metrics(workdir)]
    self.assertEqual(steps, list(range(1, 17)))  # each step once
    evaluations = read_metrics(workdir, evaluations=True)
    self.assertEqual([r['step'] for r in evaluations], [8, 16])
    self.assertIn('knn_trained_k2', evaluations[0])

  def test_nonfinite_stops_without_saving(self):
    workdir = self.create_tempdir().full_path
    result = run(
      workdir,
      '--config.optim.lr=1e41',  # peak lr overflows float32: inf weights
      '--config.optim.warmup_epochs=0',
      '--config.checkpoint_every_steps=1',
      '--config.optim.clip_grad=0',
    )
    self.assertEqual(result.returncode, 1)
    self.assertIn('not finite at step 1', result.stderr)
    self.assertIn('no checkpoint was saved yet', result.stderr)
    self.assertNotIn('Traceback', result.stderr, result.stderr[-6000:])
    self.assertEqual(checkpoints(workdir), [])


def run_in_process(workdir, *overrides, config=TINY):
  """``run``'s command line through ``dino_jax.main`` in this process.

  What ``python -m dino_jax.main`` does after ``app.run``: its parse, then
  ``main`` (flags in a fresh FlagValues, ``sys.argv`` as the process would
  have it for ml_collections' overrides). Returns a CompletedProcess with
  the exit status and stderr (``console.say``'s lines, the log records,
  and an uncaught exception's traceback with status 1, as the interpreter
  prints it). This process has the suite's 8 CPU devices (conftest). For
  bad command lines only: a run that gets past the checks to training
  raises (its traceback in stderr) instead of training here.
  """
  import contextlib
  import io
  import logging
  import traceback
  import types
  from unittest import mock

  import jax

  from dino_jax import train
  from dino_jax.cli import flags as cli_flags

  with mock.patch.object(flags, 'FLAGS', flags.FlagValues()):
    from dino_jax import main as main_lib  # its flags: not the suite's FLAGS

  argv = command(workdir, *overrides, config=config)[2:]  # from dino_jax.main
  values = flags.FlagValues()
  cli_flags.define_training_flags(values)
  stderr = io.StringIO()
  log = logging.StreamHandler(stderr)
  root, absl_logger = logging.getLogger(), logging.getLogger('absl')
  saved = (
    absl_logger.level,
    jax.config.jax_compilation_cache_dir,
    jax.config.jax_enable_compilation_cache,
  )
  refused = AssertionError('accepted: training started in-process')
  status = 0
  root.addHandler(log)
  try:
    with (
      contextlib.redirect_stderr(stderr),
      mock.patch.object(sys, 'argv', argv),
      mock.patch.object(main_lib, 'flags', types.SimpleNamespace(FLAGS=values)),
      mock.patch.object(train, '_Training', side_effect=refused),
    ):
      try:
        main_lib.main(main_lib.parse_flags(argv))
      except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
      except Exception:  # noqa: BLE001 - the interpreter's report
        stderr.write(traceback.format_exc())
        status = 1
  finally:
    root.removeHandler(log)
    absl_logger.setLevel(saved[0])
    jax.config.update('jax_compilation_cache_dir', saved[1])
    jax.config.update('jax_enable_compilation_cache', saved[2])
  return subprocess.CompletedProcess(argv, status, '', stderr.getvalue())


class ErrorTest(absltest.TestCase):
  """Bad command lines of ``dino_jax.main``, run in this process (its 8
  devices); one real process checks the exit status and the line."""

  def assert_error(self, result, pattern):
    self.assertEqual(result.returncode, 1, result.stderr[-2000:])
    self.assertRegex(result.stderr, pattern)
    self.assertNotIn('Traceback', result.stderr, result.stderr[-6000:])

  def test_a_bad_value_in_a_real_process(self):
    # The process boundary: python -m dino_jax.main on 8 devices (XLA_FLAGS)
    # exits 1 with one error line, the last on stderr, and no traceback.
    workdir = self.create_tempdir().full_path
    result = run(workdir, '--config.batch_size=12', devices=8)
    self.assert_error(result, r'error: batch_size=12 is not divisible')
    lines = [x for x in result.stderr.splitlines() if x.startswith('error:')]
    self.assertEqual(
      lines, ['error: batch_size=12 is not divisible by the 8 devices']
    )
    self.assertEqual(result.stderr.splitlines()[-1], lines[0])
    self.assertEqual(os.listdir(workdir), [])

  def test_bad_values(self):
    workdir = self.create_tempdir().full_path
    self.assert_error(
      run_in_process(workdir, '--config.crops.local_size=12'),
      r'error: crops.local_size=12 is not divisible by '
      r'model.patch_size=8',
    )
    self.assert_error(
      run_in_process(workdir, '--config.batch_size=12'),
      r'error: batch_size=12 is not divisible by the 8 '
      r'devices',
    )
    self.assert_error(
      run_in_process(
        workdir,
        '--config.data.source=imagefolder',
        '--config.data.path=/no/such/dir',
      ),
      r"error: ImageFolder root '/no/such/dir' is not a directory",
    )
    self.assert_error(
      run_in_process(workdir, '--config.model.arch=vit_huge'),
      r"error: model.arch='vit_huge' unknown",
    )
    self.assert_error(
      run_in_process(workdir, '--config.mesh.fsdp=3'),
      r'error: mesh.fsdp=3 does not divide the 8 devices',
    )
    # Before: accepted, and JAX's IndivisibleError traceback came in the
    # first evaluation, after training.
    self.assert_error(
      run_in_process(workdir, '--config.eval.batch_size=12'),
      r'error: eval.batch_size=12 is not a multiple of the 8 devices \(the '
      r'evaluation splits it over them\); use --config.eval.batch_size=8 or '
      r'16',
    )

  def test_bad_paths_create_nothing(self):
    parent = self.create_tempdir().full_path
    missing = os.path.join(parent, 'new')
    self.assert_error(
      run_in_process(
        missing, config=os.path.join(ROOT, 'configs', 'no_such.py')
      ),
      r'error: --config=.*no_such.py cannot be loaded \(.*No such file',
    )
    a_file = os.path.join(parent, 'a_file')
    with open(a_file, 'w') as f:
      f.write('x')
    self.assert_error(
      run_in_process(a_file),
      r'error: --workdir=.*a_file is a file, not a directory',
    )
    self.assert_error(
      run_in_process('/proc/dino_jax_test'),
      r'error: --workdir=/proc/dino_jax_test is under /proc',
    )
    self.assert_error(
      run_in_process(
        missing,
        '--config.data.source=imagefolder',
        '--config.data.path=/no/such/dir',
      ),
      r"error: ImageFolder root '/no/such/dir' is not a directory",
    )
    self.assertEqual(sorted(os.listdir(parent)), ['a_file'])
    self.assertFalse(os.path.exists('/proc/dino_jax_test'))

  def test_unknown_field(self):
    workdir = self.create_tempdir().full_path
    self.assert_error(
      run_in_process(workdir, '--config.optim.lrr=1'),
      r'error: unknown config field in --config.optim.lrr: .*'
      r'Did you mean "lr" instead of "lrr"',
    )


def test_metrics_values_are_numbers():
  # Guard for the JSON writer: numpy scalars become plain numbers.
  from dino_jax import metrics

  assert metrics._plain(np.float32(1.5)) == 1.5
  assert isinstance(metrics._plain(np.float32(1.5)), float)


def test_health_guard_names_the_bad_state():
  from dino_jax import metrics

  ok = {'loss': 1.0, 'teacher_entropy': 0.5, 'state_finite': 1.0}
  assert metrics.check_health(3, ok, 64, 2) == []
  with pytest.raises(
    metrics.NonFiniteLossError,
    match='updated parameters not finite at step 3.*last good checkpoint '
    'is step 2',
  ):
    metrics.check_health(3, {**ok, 'state_finite': 0.0}, 64, 2)
  with pytest.raises(metrics.NonFiniteLossError, match='loss is inf: not'):
    metrics.check_health(3, {**ok, 'loss': float('inf')}, 64, None)


def test_metrics_writer_drops_a_broken_line(tmp_path):
  # A run killed (or a full disk) mid-line leaves a partial last row; the
  # resumed run must neither crash on it nor append its next row to it.
  from dino_jax import metrics

  path = tmp_path / 'metrics.jsonl'
  rows = [{'step': s, 'loss': 5.0 - s} for s in (1, 2, 3)]
  path.write_text(
    ''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 4, "lo'
  )
  writer = metrics.MetricWriter(str(tmp_path), resume_step=2)
  assert writer.has_evaluation(2) is False
  writer.write(3, {'loss': 1.5})
  writer.write(3, {'knn_trained_k20': 60.0})
  writer.close()
  lines = path.read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
    rows[0],
    rows[1],
    {'step': 3, 'loss': 1.5},
    {'step': 3, 'knn_trained_k20': 60.0},
  ]
  assert writer.has_evaluation(3) and not writer.has_evaluation(2)
