"""Retrieval, copy detection and video on 2 processes equal 1 process.

Two processes (2 fake CPU devices each, the mesh's devices rotated so
that a process's rows of a batch are not one block, the larger parameters
fsdp-split across the two processes) evaluate a tiny
workdir with the three protocols named in the config, as a run does at
its end; one process with 4 devices evaluates a copy of it. Each of the
two reads only its share of the images (retrieval: every other image;
copy detection: its devices' rows of each batch; video: every other
sequence), and both records, and the DAVIS PNGs, are the same.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import portpicker
import pytest
from test_cli import env as cli_env
from test_downstream_run import downstream_fixtures
from test_eval_cli import tiny_workdir

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def second_sequence(davis: str) -> None:
  """The synthetic 'square' sequence again as 'square2' (2 sequences)."""
  for kind in ('JPEGImages', 'Annotations'):
    folder = os.path.join(davis, kind, '480p')
    shutil.copytree(
      os.path.join(folder, 'square'), os.path.join(folder, 'square2')
    )
  with open(os.path.join(davis, 'ImageSets', '2017', 'val.txt'), 'a') as f:
    f.write('square2\n')


def _start(workdir, devices, num_processes, process_id, port, overrides):
  return subprocess.Popen(
    [
      sys.executable,
      os.path.join(HERE, 'multihost_downstream_worker.py'),
      workdir,
      str(devices),
      str(num_processes),
      str(process_id),
      str(port),
      *overrides,
    ],
    env=cli_env(devices=devices),  # the worker sets its own count last
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _reads(procs):
  """Each process's ``images read`` counts (all must exit 0)."""
  logs = [p.communicate(timeout=600)[0] for p in procs]
  counts = []
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-4000:]
    (line,) = re.findall(r'^images read: (.*)$', log, re.M)
    counts.append(json.loads(line))
  return counts


def _outputs(workdir):
  with open(os.path.join(workdir, 'eval', 'downstream.json')) as f:
    record = json.load(f)
  davis = os.path.join(workdir, 'eval', 'davis')
  pngs = {}
  for seq in sorted(os.listdir(davis)):
    for name in sorted(os.listdir(os.path.join(davis, seq))):
      with open(os.path.join(davis, seq, name), 'rb') as f:
        pngs[f'{seq}/{name}'] = f.read()
  return record, pngs


@pytest.mark.slow
def test_two_processes_evaluate_as_one(tmp_path):
  fields = downstream_fixtures(str(tmp_path / 'data'))
  second_sequence(fields['davis_root'])
  overrides = [
    # Parameters split over both processes: each gathers a local copy.
    '--config.mesh.fsdp=2',
    '--config.mesh.fsdp_min_size=1024',
    '--config.eval.knn=false',
    '--config.eval.attention_images=0',
    *(f'--config.eval.{k}={v}' for k, v in fields.items()),
  ]
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  tiny_workdir(multi)
  shutil.copytree(multi, single)
  port = portpicker.pick_unused_port()
  procs = [_start(multi, 2, 2, i, port, overrides) for i in range(2)]
  procs.append(_start(single, 4, 1, 0, 0, overrides))
  shares = _reads(procs[:2])
  (alone,) = _reads(procs[2:])
  got, got_pngs = _outputs(multi)
  want, want_pngs = _outputs(single)
  assert set(want) == {'step', 'retrieval', 'copy_detection', 'davis'}
  assert got == want
  assert len(want_pngs) == 12  # 2 sequences x 6 frames
  assert got_pngs == want_pngs
  # Each process read its share only: together, each image once.
  # Retrieval 8 + 2 images; copy detection 3 originals, 8 queries and 4
  # whitening images (batches of eval.batch_size 8: 2 rows a device);
  # video 6 frames a sequence.
  assert alone == {'retrieval': 10, 'copy_detection': 15, 'video': 12}
  for name, total in alone.items():
    assert sum(s.get(name, 0) for s in shares) == total, (name, shares)
    assert all(0 < s[name] < total for s in shares), (name, shares)
