"""No libtpu noise on a machine without a TPU when libtpu is installed.

CI installs '.[tpu]' (libtpu, for dino_jax.aot); before the platform was
chosen at start-up every CPU command printed libtpu's probe errors.
"""

import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from test_cli import env
from test_eval_cli import tiny_workdir

from dino_jax import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = ('host bounds', 'jellyfish', 'Source Location Trace', 'TPU_WORKER')


class ChoosePlatformTest(absltest.TestCase):
  def test_cpu_without_accelerator_users_choice_kept(self):
    environ = {}
    hostmem.choose_platform(environ, accelerator=False)
    self.assertEqual(environ['JAX_PLATFORMS'], 'cpu')
    environ = {'JAX_PLATFORMS': 'cuda'}
    hostmem.choose_platform(environ, accelerator=False)
    self.assertEqual(environ['JAX_PLATFORMS'], 'cuda')
    environ = {}
    hostmem.choose_platform(environ, accelerator=True)
    self.assertNotIn('JAX_PLATFORMS', environ)

  def test_knn_cli_prints_no_backend_probe_noise(self):
    if hostmem._has_accelerator():
      self.skipTest('this machine has an accelerator: the probe is real')
    workdir = tempfile.mkdtemp()
    tiny_workdir(workdir)
    e = env()
    del e['JAX_PLATFORMS']  # as a user's shell: nothing set
    result = subprocess.run(
      [sys.executable, '-m', 'dino_jax.eval.knn', f'--workdir={workdir}'],
      env=e,
      capture_output=True,
      text=True,
      timeout=600,
      cwd=ROOT,
    )
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn('k-NN trained (step 0)', result.stdout)
    for line in NOISE:
      self.assertNotIn(line, result.stderr)


if __name__ == '__main__':
  absltest.main()
