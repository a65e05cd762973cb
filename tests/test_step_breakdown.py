"""benchmarks/step_breakdown.py: the step compiled in parts.

The parts are separate programs, so what one part computes is not seen by
another; their FLOPs must add up to the whole step's (XLA's count of each
compiled program, on this CPU), and each part must hold the matmuls the
analytic count (dino_jax/flops.py) gives it.
"""

import os
import sys

import jax
import pytest
from tiny import tiny_config

from dino_jax import aot, parallel
from dino_jax import flops as flops_lib

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks')
)
import step_breakdown  # noqa: E402


def _config():
  config = tiny_config(batch_size=8)
  config.data.canvas_size = 40
  return config


@pytest.mark.slow
def test_parts_add_up_to_the_whole_step():
  config = _config()
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  result = step_breakdown.breakdown(config, mesh, 'cpu')
  parts, step = result['parts'], result['step']
  assert list(parts) == list(step_breakdown.PARTS)
  # Every FLOP of the step is in exactly one part (measured: 0.1 % apart;
  # a part missing, e.g. the teacher, would take 17 % off the sum).
  assert result['sum']['flops_per_image'] == pytest.approx(
    step['flops_per_image'], rel=0.03
  )
  # The bytes add up too, less what the whole step fuses across the parts'
  # boundaries (the features and gradients each part writes and the next
  # reads): measured 0.8 % apart on this CPU.
  assert result['sum']['bytes_per_image'] == pytest.approx(
    step['bytes_per_image'], rel=0.1
  )
  # Each part holds its own matmuls: the analytic counts per image, with
  # XLA's elementwise work on top (LayerNorm, GELU, softmax: a few %).
  dims = {'embed_dim': 32, 'depth': 2}
  size = config.crops
  vit = {
    s: flops_lib.vit_forward_flops(s, config.model.patch_size, **dims)
    for s in (size.global_size, size.local_size)
  }
  analytic = flops_lib.from_config(config)
  expected = {
    # Forward + backward; the patch embedding has no input gradient.
    'student global': 2
    * (
      vit[size.global_size]['patch_embed'] + 3 * vit[size.global_size]['blocks']
    ),
    'student local': size.local_number
    * (
      vit[size.local_size]['patch_embed'] + 3 * vit[size.local_size]['blocks']
    ),
    'teacher forward': analytic['teacher'] / config.batch_size,
  }
  for name, matmuls in expected.items():
    ratio = parts[name]['flops_per_image'] / matmuls
    assert 1.0 <= ratio < 1.25, (name, ratio)
  table = step_breakdown.format_table(result)
  assert table.splitlines()[-1].startswith('| whole step |')


def test_resnet_is_one_error_line():
  config = _config()
  config.model.arch = 'resnet18'
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  with pytest.raises(aot.AotError, match=r"model.arch='resnet18'"):
    step_breakdown.part_programs(config, mesh, 'cpu')
