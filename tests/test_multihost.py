"""Two local processes (jax.distributed, 127.0.0.1) equal one process."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest
from test_step import run_steps_global

from dino_jax import parallel

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  port = str(portpicker.pick_unused_port())
  out = str(tmp_path / 'out.json')
  env = dict(os.environ)  # the worker sets its device count
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        os.path.join(HERE, 'multihost_worker.py'),
        str(i),
        port,
        out,
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-3000:]
  with open(out) as f:
    multi = json.load(f)
  mesh = parallel.make_mesh(devices=jax.devices()[:4])
  losses, checksum = run_steps_global(mesh, 3)
  np.testing.assert_allclose(multi['losses'], losses, rtol=1e-5)
  np.testing.assert_allclose(multi['checksum'], checksum, rtol=1e-5)
