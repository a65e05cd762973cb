"""gs:// workdirs against a local fake GCS server (the ``gcs`` fixture).

The file layer (``dino_jax.storage``), the object lock, one-line errors for
bad remote paths, and the pod rehearsal: two processes train on a gs://
workdir and gs:// data, are stopped by SIGTERM, resume, finish and evaluate.
"""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import portpicker
import pytest
from PIL import Image
from test_launch import quick_env

from dino_jax import metrics as metrics_lib
from dino_jax import storage
from dino_jax import workdir as workdir_lib
from dino_jax.cli import lock as lock_lib

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, 'tiny_config.py')
_buckets = iter(range(10**6))


def new_bucket(gcs) -> str:
  """A fresh bucket: ``(name, 'gs://name')``."""
  name = f'b{os.getpid()}-{next(_buckets)}'
  return name, gcs.create_bucket(name)


def test_files_roundtrip_and_move(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a stray local 'gs:' folder would land here
  name, url = new_bucket(gcs)
  run = f'{url}/run'
  assert storage.join(run, 'eval', 'knn.json') == f'{run}/eval/knn.json'
  storage.makedirs(run)  # a prefix: nothing to create
  for step, size in (('7', 3), ('9', 1)):
    for i in range(size):
      storage.write_bytes(f'{run}/checkpoints/{step}/d/{i}', bytes([i] * 4))
  storage.write_text(f'{run}/config.json', '{"a": 1}')
  storage.write_text(f'{run}/config.json', '{"a": 2}')  # replaced whole
  assert storage.read_text(f'{run}/config.json') == '{"a": 2}'
  storage.move_tree(f'{run}/checkpoints/7', f'{run}/damaged_checkpoints/7')
  assert gcs.list(name) == [
    'run/checkpoints/9/d/0',
    'run/config.json',
    'run/damaged_checkpoints/7/d/0',
    'run/damaged_checkpoints/7/d/1',
    'run/damaged_checkpoints/7/d/2',
  ]
  assert gcs.read(name, 'run/damaged_checkpoints/7/d/2') == bytes([2] * 4)
  assert not os.path.exists(tmp_path / 'gs:')


def _parts(gcs, name: str, prefix: str) -> list[str]:
  """The objects of a remote metrics.jsonl, in order (names sort)."""
  folder = f'{prefix}/metrics.jsonl.d/'
  return [n for n in gcs.list(name) if n.startswith(folder)]


def _metric_rows(gcs, name: str, prefix: str) -> list[dict]:
  """The rows of a remote metrics.jsonl, read from the server directly."""
  text = b''.join(gcs.read(name, n) for n in _parts(gcs, name, prefix))
  return [json.loads(line) for line in text.decode().splitlines()]


def test_metrics_rows_replaced_and_dropped(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  name, url = new_bucket(gcs)
  run = f'{url}/run'
  writer = metrics_lib.MetricWriter(run)
  for step in (1, 2, 3):
    writer.write(step, {'loss': float(step)})
  writer.write(3, {'knn_trained_k2': 50.0})
  writer.write(3, {'knn_trained_k2': 60.0}, replace=True)
  writer.close()
  expected = [
    {'step': 1, 'loss': 1.0},
    {'step': 2, 'loss': 2.0},
    {'step': 3, 'loss': 3.0},
    {'step': 3, 'knn_trained_k2': 60.0},
  ]
  assert _metric_rows(gcs, name, 'run') == expected
  assert metrics_lib.read_rows(f'{run}/metrics.jsonl') == (expected, [])
  assert 'run/metrics.jsonl' not in gcs.list(name)  # parts only
  # A resume from step 2 drops the later rows, in the bucket too.
  writer = metrics_lib.MetricWriter(run, resume_step=2)
  assert not writer.has_evaluation(3)
  writer.write(3, {'loss': 30.0})
  writer.close()
  rows = _metric_rows(gcs, name, 'run')
  assert [(r['step'], r['loss']) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30)]
  assert any(n.startswith('run/tensorboard/') for n in gcs.list(name))
  assert not os.path.exists(tmp_path / 'gs:')


def test_metrics_uploads_grow_linearly(gcs, tmp_path, monkeypatch):
  # Each log step uploads one part of at most PART_ROWS rows, not every row
  # so far: the bytes uploaded over a run grow as its rows, not their
  # square; plot and the readers see every row, in order.
  from dino_jax import plot

  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(metrics_lib, 'PART_ROWS', 10)
  uploads = []
  write_bytes = storage.write_bytes

  def counted(path, data):
    if '/metrics.jsonl' in path:
      uploads.append((path, len(data)))
    write_bytes(path, data)

  monkeypatch.setattr(storage, 'write_bytes', counted)
  name, url = new_bucket(gcs)
  run = f'{url}/run'
  writer = metrics_lib.MetricWriter(run)
  rows, uploaded = [], {}
  for step in range(1, 81):
    row = {'step': step, 'loss': 1000.0 + step}
    if step % 20 == 0:
      row['knn_trained_k20'] = 50.0 + step / 10
    writer.write(step, {k: v for k, v in row.items() if k != 'step'})
    rows.append(row)
    uploaded[step] = sum(size for _, size in uploads)
  writer.close()
  assert len(uploads) == 80  # one upload a step
  row_bytes = len(json.dumps(rows[0]) + '\n')
  # Whole-file rewrites would upload n (n + 1) / 2 rows: 820 for 40 steps,
  # 3240 for 80; parts of 10 rows upload 5.5 rows a step: 220 and 440.
  assert uploaded[40] < 6 * 40 * row_bytes
  assert uploaded[80] < 2.2 * uploaded[40]
  assert uploaded[80] < 80 * 81 / 2 * row_bytes / 5
  assert _parts(gcs, name, 'run') == [
    f'run/metrics.jsonl.d/{i:09d}.jsonl' for i in range(0, 80, 10)
  ]
  assert _metric_rows(gcs, name, 'run') == rows
  assert metrics_lib.read_rows(f'{run}/metrics.jsonl') == (rows, [])
  curves = plot.read_curves(run, k=20)
  assert curves['knn'] == {
    'trained': [(s, 50.0 + s / 10) for s in (20, 40, 60, 80)]
  }
  assert [s for s, _ in curves['loss']] == list(range(1, 81))
  # A resume mid-part: that part is cut, the later ones deleted.
  uploads.clear()
  writer = metrics_lib.MetricWriter(run, resume_step=25)
  writer.write(26, {'loss': 26.5})
  writer.close()
  assert _parts(gcs, name, 'run') == [
    f'run/metrics.jsonl.d/{i:09d}.jsonl' for i in (0, 10, 20)
  ]
  expected = rows[:25] + [{'step': 26, 'loss': 26.5}]
  assert _metric_rows(gcs, name, 'run') == expected
  assert len(uploads) <= 4  # the parts rewritten, then the new row's


def test_metrics_single_object_becomes_parts(gcs, tmp_path, monkeypatch):
  # A gs:// workdir whose metrics.jsonl is one object (an earlier version):
  # read as before, and turned into parts by the next run.
  monkeypatch.chdir(tmp_path)
  name, url = new_bucket(gcs)
  run = f'{url}/run'
  rows = [{'step': s, 'loss': float(s)} for s in (1, 2, 3)]
  text = ''.join(json.dumps(r) + '\n' for r in rows)
  storage.write_text(f'{run}/metrics.jsonl', text + '{"step": 4, "lo')
  assert metrics_lib.read_rows(f'{run}/metrics.jsonl') == (rows, [4])
  writer = metrics_lib.MetricWriter(run, resume_step=3)
  writer.write(4, {'loss': 4.0})
  writer.close()
  assert 'run/metrics.jsonl' not in gcs.list(name)
  assert _metric_rows(gcs, name, 'run') == [*rows, {'step': 4, 'loss': 4.0}]


def test_object_lock_one_holder_heartbeat_release(gcs):
  name, url = new_bucket(gcs)
  run = f'{url}/run'
  lock = lock_lib.ObjectLock(run, heartbeat_s=0.2)
  lock.acquire()
  first = json.loads(gcs.read(name, 'run/lock'))
  assert first['state'] == 'held' and first['pid'] == os.getpid()
  generation = lock._generation
  time.sleep(0.7)  # heartbeats rewrite it, each on its own generation
  assert lock._generation != generation
  with pytest.raises(workdir_lib.WorkdirError, match='is in use by pid'):
    lock_lib.ObjectLock(run).acquire()
  lock.release()
  record = json.loads(gcs.read(name, 'run/lock'))
  assert record['state'] == 'released' and record['pid'] == os.getpid()
  with lock_lib.lock(run) as again:  # a released lock is taken at once
    assert isinstance(again, lock_lib.ObjectLock)
    assert json.loads(gcs.read(name, 'run/lock'))['state'] == 'held'


def test_object_lock_racers_and_stale_takeover(gcs):
  name, url = new_bucket(gcs)
  run = f'{url}/run'
  won, lost = [], []
  barrier = threading.Barrier(6)

  def race():
    lock = lock_lib.ObjectLock(run, heartbeat_s=3600)
    barrier.wait()
    try:
      lock.acquire()
      won.append(lock)
    except workdir_lib.WorkdirError as e:
      lost.append(str(e))

  threads = [threading.Thread(target=race) for _ in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(won) == 1 and len(lost) == 5, lost
  # The holder stops beating (a host that died): stale after stale_s.
  won[0]._stop.set()
  won[0]._thread.join()
  with pytest.raises(workdir_lib.WorkdirError, match='in use'):
    lock_lib.ObjectLock(run, stale_s=60).acquire()
  time.sleep(1.5)
  taker = lock_lib.ObjectLock(run, stale_s=1.0)
  taker.acquire()
  taker.release()
  assert json.loads(gcs.read(name, 'run/lock'))['state'] == 'released'


def _main(workdir, *flags, environ, cwd, stderr=subprocess.PIPE):
  return subprocess.Popen(
    [
      sys.executable,
      '-m',
      'dino_jax.main',
      f'--config={TINY}',
      f'--workdir={workdir}',
      *flags,
    ],
    env=environ,
    cwd=cwd,
    stdout=subprocess.DEVNULL,
    stderr=stderr,
    text=True,
  )


def _errors(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith('error:')]


class TestCommandLine:
  """The CLI on gs:// paths (its own class: pytest-xdist's --dist loadscope
  runs it on one worker while the other runs the pod rehearsal)."""

  @pytest.mark.slow
  def test_bad_remote_paths_fail_in_one_line(self, gcs, tmp_path):
    name, url = new_bucket(gcs)
    environ = {**quick_env(), **gcs.env()}
    # Three independent runs, started together: each fails before it
    # writes anything.
    runs = [
      _main('gs://no-such-bucket/run', environ=environ, cwd=tmp_path),
      _main(
        f'{url}/run',
        environ={
          **environ,
          'FSSPEC_GCS_TOKEN': 'google_default',
          'GOOGLE_APPLICATION_CREDENTIALS': str(tmp_path / 'missing.json'),
        },
        cwd=tmp_path,
      ),
      _main(
        f'{url}/run',
        '--config.data.source=imagefolder',
        f'--config.data.path={url}/missing',
        environ=environ,
        cwd=tmp_path,
      ),
    ]
    (err, rc), (err2, rc2), (err3, rc3) = [
      (p.communicate(timeout=120)[1], p.returncode) for p in runs
    ]
    assert rc == 1, err[-2000:]
    assert _errors(err) == [
      'error: --workdir=gs://no-such-bucket/run: bucket gs://no-such-bucket '
      'does not exist; create it (gcloud storage buckets create '
      'gs://no-such-bucket) or pass another path'
    ]
    assert rc2 == 1, err2[-2000:]
    (line,) = _errors(err2)
    assert line.startswith(f'error: no credentials for --workdir={url}/run')
    assert 'gcloud auth application-default login' in line
    assert rc3 == 1, err3[-2000:]
    assert _errors(err3) == [
      f"error: ImageFolder root '{url}/missing' is not a directory"
    ]
    # A server that accepts connections and never answers: the probe the
    # CLI makes (20 s there; 2 s here), in a process without JAX.
    with socket.socket() as silent:
      silent.bind(('127.0.0.1', 0))
      silent.listen(16)
      endpoint = f'http://127.0.0.1:{silent.getsockname()[1]}'
      probe = (
        'from dino_jax import storage\n'
        'try:\n'
        f'  storage.check_reachable({url + "/run"!r}, timeout=2)\n'
        'except storage.StorageError as e:\n'
        '  print(e)\n'
      )
      start = time.time()
      done = subprocess.run(
        [sys.executable, '-c', probe],
        env={**environ, 'STORAGE_EMULATOR_HOST': endpoint},
        capture_output=True,
        text=True,
        timeout=60,
      )
      seconds = time.time() - start
    assert done.stdout.startswith(
      f'no answer for --workdir={url}/run within 2 s'
    ), done.stdout + done.stderr[-2000:]
    assert seconds < 20
    assert gcs.list(name) == []  # nothing half-written
    assert not os.path.exists(tmp_path / 'gs:')

  @pytest.mark.slow
  def test_two_runs_on_one_gs_workdir_one_trains(self, gcs, tmp_path):
    name, url = new_bucket(gcs)
    environ = {**quick_env(), **gcs.env()}
    flags = (
      '--config.total_steps=2',
      '--config.eval.knn=False',
      '--config.eval.attention_images=0',
    )
    procs = [
      _main(f'{url}/run', *flags, environ=environ, cwd=tmp_path)
      for _ in range(2)
    ]
    results = [(p.wait(timeout=400), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 1], [err[-1500:] for _, err in results]
    (loser,) = [err for rc, err in results if rc == 1]
    (line,) = _errors(loser)
    assert line.startswith(f'error: --workdir={url}/run is in use by pid ')
    assert [r['step'] for r in _metric_rows(gcs, name, 'run')] == [1, 2]
    assert not os.path.exists(tmp_path / 'gs:')


def _upload_images(name: str, prefix: str, count: int = 32) -> None:
  """An ImageFolder of ``count`` 40 px JPEGs in two class folders."""
  for i in range(count):
    pixels = np.random.RandomState(i).randint(0, 256, (40, 40, 3), np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format='JPEG')
    path = f'gs://{name}/{prefix}/c{i % 2}/{i:03d}.jpg'
    storage.write_bytes(path, data.getvalue())


class TestPodRehearsal:
  """Its own class: pytest-xdist's --dist loadscope runs it on one worker
  while the other runs the module's other tests."""

  @pytest.mark.slow
  def test_pod_script_on_gs(self, gcs, tmp_path):
    # README's pod command on one machine: launch/tpu_pod.sh with stub
    # gcloud/python/pip (tests/test_launch.py: two workers, each in its own
    # home), the workdir and TFDS data (imagenet2012 layout, ArrayRecord) in
    # a bucket, a preemption (SIGTERM to every worker), the same script again
    # (CREATE=0) to resume, finish and evaluate; then the tools on the
    # bucket. One multi-process training for the script, the gs:// workdir
    # and the preemption (three tests once).
    import tfds_imagenet
    from test_launch import _GCLOUD, _PIP, _PYTHON, _stubs

    name, url = new_bucket(gcs)
    tfds_imagenet.upload(
      tfds_imagenet.build(str(tmp_path / 'tfds')), f'{url}/tfds'
    )
    run = f'{url}/pod run'  # a space: the script's quoting is exercised
    homes = tmp_path / 'homes'
    homes.mkdir()
    environ = {
      **quick_env(),
      **gcs.env(),
      'PATH': _stubs(tmp_path, gcloud=_GCLOUD, python=_PYTHON, pip=_PIP)
      + os.pathsep
      + os.environ['PATH'],
      'STUB_LOG': str(tmp_path / 'stub.log'),
      'STUB_HOMES': str(homes),
      'STUB_WORKERS': '2',
      'STUB_PYTHON': sys.executable,
      'TPU_NAME': 'dino-test',
      'ZONE': 'us-test1-a',
      'WORKDIR': run,
      'REPO': os.path.dirname(HERE),
    }
    flags = [
      f'--config={TINY}',
      '--config.eval.ks=(2, 4)',  # a space inside one argument
      '--config.data.source=tfds',
      '--config.data.name=imagenet2012',
      f'--config.data.path={url}/tfds',
      '--config.eval.test_split=validation',
      '--config.checkpoint_every_steps=1000',
    ]
    script = os.path.join(os.path.dirname(HERE), 'launch', 'tpu_pod.sh')

    def launch(*more):
      environ['STUB_PORT'] = str(portpicker.pick_unused_port())
      return subprocess.Popen(
        ['bash', script, *flags, *more],
        env=environ,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )

    start = time.time()
    proc = launch('--config.total_steps=1000')
    pid_files = [homes / f'worker{i}.pid' for i in range(2)]
    deadline = time.time() + 400
    while len(_metric_rows(gcs, name, 'pod run')) < 3 or not all(
      p.exists() and p.read_text().strip() for p in pid_files
    ):
      assert time.time() < deadline, 'no progress'
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      time.sleep(0.2)
    pids = [int(p.read_text()) for p in pid_files]
    held = json.loads(gcs.read(name, 'pod run/lock'))
    assert held['state'] == 'held' and held['pid'] == pids[0]
    for pid in pids:
      os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    first = time.time() - start
    assert proc.returncode == 0, err[-3000:]
    assert 'Traceback' not in err
    saved = sorted(
      {int(n.split('/')[2]) for n in gcs.list(name, 'pod run/checkpoints/')}
    )
    assert len(saved) == 1, saved
    assert err.count(f'saved step {saved[0]} in {run}') == 2, err[-3000:]
    for path in pid_files:
      path.unlink()
    environ['CREATE'] = '0'  # the same script resumes on the same VMs
    start = time.time()
    proc = launch(f'--config.total_steps={saved[0] + 2}')
    _, err = proc.communicate(timeout=400)
    resumed = time.time() - start
    assert proc.returncode == 0, err[-3000:]
    assert err.count(f'resuming from step {saved[0]} in {run}') == 2
    print(f'pod script on gs://: {first:.0f} s to SIGTERM, {resumed:.0f} s')
    rows = _metric_rows(gcs, name, 'pod run')
    trained = [r['step'] for r in rows if 'loss' in r]
    assert trained == list(range(1, saved[0] + 3))  # every row once
    (knn,) = [r for r in rows if 'knn_trained_k2' in r]
    assert knn['step'] == saved[0] + 2
    objects = gcs.list(name, 'pod run/')
    assert f'pod run/checkpoints/{saved[0]}/commit_success.txt' in objects
    assert f'pod run/checkpoints/{saved[0] + 2}/commit_success.txt' in objects
    assert 'pod run/config.json' in objects
    config = json.loads(gcs.read(name, 'pod run/config.json'))
    assert config['data']['path'] == f'{url}/tfds'
    assert config['eval']['ks'] == [2, 4]
    assert 'pod run/eval/knn.json' in objects
    assert 'pod run/eval/attention/test0-overview.png' in objects
    assert any(n.startswith('pod run/tensorboard/') for n in objects)
    released = json.loads(gcs.read(name, 'pod run/lock'))
    assert released['state'] == 'released'
    # What the script did on the (stub) VMs.
    with open(tmp_path / 'stub.log') as f:
      log = f.read().splitlines()
    creates = [line for line in log if 'tpu-vm create' in line]
    assert creates == [
      'gcloud compute tpus tpu-vm create dino-test --zone=us-test1-a '
      '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base'
    ]
    installs = sorted(line for line in log if line.startswith('pip '))
    # Two workers, two runs.
    assert installs == ['pip install -q -e .[gcs,tpu] (in dino_jax)'] * 4
    assert all(
      (homes / f'worker{i}' / 'dino_jax' / '.git').is_dir() for i in (0, 1)
    )
    commands = [
      line.split(': ', 1)[1] for line in log if line.startswith('worker')
    ]
    assert len(commands) == 4
    expected = (
      f'-m dino_jax.main --workdir={run} {" ".join(flags)} '
      '--config.total_steps='
    )
    assert all(c.startswith(expected) for c in commands), commands
    # The tools read the workdir from the bucket and write into it (both
    # at once: they read, and write different objects).
    tools = [
      subprocess.Popen(
        [sys.executable, '-m', *tool],
        env=environ,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
      )
      for tool in (
        ['dino_jax.plot', f'--workdir={run}', '--k=2'],
        ['dino_jax.interop', 'export', run, f'{url}/teacher.pth'],
      )
    ]
    for tool in tools:
      err = tool.communicate(timeout=300)[1]
      assert tool.returncode == 0, err[-3000:]
    assert gcs.read(name, 'pod run/curve.png')[:4] == b'\x89PNG'
    import torch

    weights = torch.load(io.BytesIO(gcs.read(name, 'teacher.pth')))
    assert weights['cls_token'].shape == (1, 1, 32)
    assert not os.path.exists(tmp_path / 'gs:')
    assert not os.path.exists(os.path.join(os.path.dirname(HERE), 'gs:'))


def test_damaged_checkpoint_on_gs_is_moved_whole(gcs, tmp_path, monkeypatch):
  # Orbax writes through TensorStore; the damaged step is copied object by
  # object to damaged_checkpoints/ (no rename of a prefix on GCS).
  import jax
  import jax.numpy as jnp
  from tiny import tiny_config

  from dino_jax import checkpoint as checkpoint_lib

  monkeypatch.chdir(tmp_path)
  name, url = new_bucket(gcs)
  config = tiny_config()
  ckpt = checkpoint_lib.Checkpointer(f'{url}/run/checkpoints')
  for step in (2, 4):
    ckpt.save(step, {'w': jnp.full((4,), float(step))}, config)
  ckpt.wait()
  ckpt.close()
  damaged = gcs.list(name, 'run/checkpoints/4/')
  for obj in damaged:
    if '/d/' in obj:  # the array data of step 4
      storage.as_path(f'{url}/{obj}').unlink()
  abstract = {'w': jax.ShapeDtypeStruct((4,), jnp.float32)}
  ckpt = checkpoint_lib.Checkpointer(f'{url}/run/checkpoints')
  step, _, state = ckpt.restore_newest(lambda saved: abstract)
  ckpt.close()
  assert step == 2 and state['w'].tolist() == [2.0] * 4
  objects = gcs.list(name, 'run/')
  assert not any(n.startswith('run/checkpoints/4/') for n in objects)
  moved = [n for n in objects if n.startswith('run/damaged_checkpoints/4/')]
  kept = [n for n in damaged if '/d/' not in n]
  assert sorted(moved) == sorted(
    n.replace('run/checkpoints/', 'run/damaged_checkpoints/') for n in kept
  )
  assert not os.path.exists(tmp_path / 'gs:')


def test_tfds_imagenet_layout_from_local_and_gs(gcs, tmp_path):
  # The real imagenet2012 builder reads the ArrayRecord files TFDS built
  # (tests/tfds_imagenet.py), from a local data_dir and from a copy in the
  # bucket (array_record's reader: CLOUD_STORAGE_EMULATOR_ENDPOINT).
  import tfds_imagenet

  from dino_jax.data import sources

  local = str(tmp_path / 'tfds')
  version = tfds_imagenet.build(local)
  _, url = new_bucket(gcs)
  tfds_imagenet.upload(version, f'{url}/tfds')
  for split, size in (
    ('train', tfds_imagenet.TRAIN),
    ('validation', tfds_imagenet.VALIDATION),
  ):
    here = sources.TFDSSource('imagenet2012', split, local)
    there = sources.TFDSSource('imagenet2012', split, f'{url}/tfds')
    assert len(here) == len(there) == size
    assert len(there.classes) == 1000 and there.classes[0] == 'n01440764'
    for i in (0, size - 1):
      a, b = here[i], there[i]
      assert a['image'].shape == (32, 40, 3)
      np.testing.assert_array_equal(a['image'], b['image'])
      assert a['label'] == b['label']
    assert sorted(here[i]['label'] for i in range(size)) == sorted(
      i % tfds_imagenet.CLASSES for i in range(size)
    )
  with pytest.raises(sources.DataError, match='no-such-bucket'):
    sources.TFDSSource('imagenet2012', 'train', 'gs://no-such-bucket/tfds')
  with pytest.raises(sources.DataError, match="no TFDS dataset 'imagenet2012'"):
    sources.TFDSSource('imagenet2012', 'train', f'{url}/elsewhere')


def test_imagefolder_on_gs_lists_and_reads(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  from dino_jax.data import pipeline, sources

  name, url = new_bucket(gcs)
  _upload_images(name, 'images', count=6)
  storage.write_bytes(f'{url}/images/c0/notes.txt', b'not an image')
  source = sources.ImageFolderSource(f'{url}/images')
  assert (len(source), source.classes, source.skipped) == (6, ['c0', 'c1'], 1)
  assert [p.rsplit('/', 2)[1:] for p, _ in source.samples][:2] == [
    ['c0', '000.jpg'],
    ['c0', '002.jpg'],
  ]
  record = source[0]
  assert record['label'] == 0 and record['bytes'][:2] == b'\xff\xd8'  # JPEG
  decoded = pipeline.CanvasDecoder(48).map(record)
  assert decoded['image'].shape == (48, 48, 3)
  assert not os.path.exists(tmp_path / 'gs:')


def _overwrite(holder, content) -> None:
  """Replaces the lock object with ``content(old bytes)``, retrying while
  the holder's heartbeat wins the race."""
  from google.api_core import exceptions

  for _ in range(20):
    blob = holder._blob.bucket.get_blob(holder._blob.name)
    try:
      blob.upload_from_string(
        content(blob.download_as_bytes()), if_generation_match=blob.generation
      )
      return
    except exceptions.PreconditionFailed:
      time.sleep(0.01)
  raise AssertionError('could not overwrite the lock')


def test_object_lock_holder_stops_when_taken_over(gcs, monkeypatch):
  name, url = new_bucket(gcs)
  kills = []
  monkeypatch.setattr(os, 'kill', lambda pid, sig: kills.append((pid, sig)))
  holder = lock_lib.ObjectLock(f'{url}/run', heartbeat_s=0.2)
  holder.acquire()
  # A beat that landed though its answer was lost: same record, new
  # generation. The holder recognises it and keeps the lock.
  _overwrite(holder, lambda old: old)
  time.sleep(0.8)
  assert not holder.lost and kills == []
  # Another run takes it over: the holder stops as on SIGTERM.
  _overwrite(
    holder,
    lambda old: b'{"pid": 1, "host": "other", "started": "x", "state": "held"}',
  )
  deadline = time.time() + 5
  while not kills and time.time() < deadline:
    time.sleep(0.05)
  assert holder.lost and kills == [(os.getpid(), signal.SIGTERM)]
  holder.release()  # leaves the new holder's record alone
  assert json.loads(gcs.read(name, 'run/lock'))['host'] == 'other'
