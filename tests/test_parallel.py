"""The mesh, and the division of the compiled step's work over devices.

Equal numbers on 8 devices and on 1 (tests/test_step.py) do not show that
each device computes only its share; these tests read the compiled program:
XLA's FLOPs per device and the collectives it contains.
"""

import re

import jax
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import AxisType
from tiny import tiny_config

from dino_jax import parallel
from dino_jax import step as step_lib

_COLLECTIVE = re.compile(
  r'= (\([^=]*?\)|\S+) (all-gather|all-to-all)(?:-start)?\('
)
_SHAPE = re.compile(r'(\w+)\[([\d,]*)\]')


def gathered_shapes(hlo_text: str) -> list[tuple[int, ...]]:
  """Output shapes of every all-gather and all-to-all in ``hlo_text``."""
  shapes = []
  for match in _COLLECTIVE.finditer(hlo_text):
    for _, dims in _SHAPE.findall(match.group(1)):
      shapes.append(tuple(int(d) for d in dims.split(',') if d))
  return shapes


def compile_step(config, mesh):
  """The training program's step for ``mesh``, compiled ahead of time."""
  built = step_lib.build_sharded_step(config, mesh, steps_per_epoch=5)
  state = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    built.state_shape,
    built.state_sharding,
  )
  return built, built.jitted.lower(state, built.batch_shape).compile()


def step_config():
  config = tiny_config(batch_size=16)
  config.data.canvas_size = 40
  config.mesh.fsdp_min_size = 256  # the tiny model's large leaves split
  return config


class StepDivisionTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    config = step_config()
    _, one = compile_step(config, parallel.make_mesh(devices=jax.devices()[:1]))
    cls.one_device_flops = one.cost_analysis()['flops']

  @parameterized.parameters((8, 1), (4, 2), (2, 4))
  def test_each_device_computes_its_share(self, data, fsdp):
    config = step_config()
    n = data * fsdp
    mesh = parallel.make_mesh(data, fsdp, devices=jax.devices()[:n])
    built, compiled = compile_step(config, mesh)
    flops = compiled.cost_analysis()['flops']
    ideal = self.one_device_flops / n
    # Before the crops were kept batch-major every device computed the
    # whole global batch: 7.9x the ideal on 8 devices.
    self.assertLessEqual(flops, 1.2 * ideal, f'{flops:.3g} vs {ideal:.3g}')
    self.assertGreater(flops, 0.8 * ideal)
    # Only parameters are gathered (fsdp), never activations: the crops,
    # backbone tokens, head rows and teacher outputs stay on their device.
    # An activation grows with the batch, so the program at twice the batch
    # gathers exactly the same tensors.
    gathered = sorted(gathered_shapes(compiled.as_text()))
    if fsdp == 1:
      self.assertEqual(gathered, [])
    else:
      self.assertNotEmpty(gathered)  # the fsdp-split weights
      config.batch_size *= 2
      _, doubled = compile_step(config, mesh)
      self.assertEqual(sorted(gathered_shapes(doubled.as_text())), gathered)

  def test_gathered_shapes_parses_tuples(self):
    text = (
      '%a = f32[64,8]{1,0} all-gather(f32[8,8]{1,0} %p), dimensions={0}\n'
      '%b = (f32[4]{0}, s32[2,3]{1,0}) all-gather(f32[1]{0} %x, s32[2,1] %y)\n'
      '%c = f32[4]{0} all-reduce(f32[4]{0} %z), to_apply=%add\n'
    )
    self.assertEqual(gathered_shapes(text), [(64, 8), (4,), (2, 3)])


class MeshTest(absltest.TestCase):
  def test_axes_are_auto_and_devices_in_order_on_cpu(self):
    mesh = parallel.make_mesh(4, 2)
    self.assertEqual(dict(mesh.shape), {'data': 4, 'fsdp': 2})
    self.assertEqual(mesh.axis_types, (AxisType.Auto, AxisType.Auto))
    ids = [d.id for d in mesh.devices.reshape(-1)]
    self.assertEqual(sorted(ids), [d.id for d in jax.devices()])

  def test_slices_stack_on_data_and_fsdp_stays_inside_a_slice(self):
    devices = jax.devices()[:8]
    # Slices interleaved in device order: 0, 1, 0, 1, ...
    slice_of = {d.id: d.id % 2 for d in devices}
    mesh = parallel.make_mesh(
      4, 2, devices=devices, slice_of=lambda d: slice_of[d.id]
    )
    grid = np.vectorize(lambda d: slice_of[d.id])(mesh.devices)
    # Rows 0-1 are slice 0, rows 2-3 slice 1: an fsdp group (a row) never
    # spans two slices, and 'data' crosses the slices.
    np.testing.assert_array_equal(grid, [[0, 0], [0, 0], [1, 1], [1, 1]])

  def test_bad_meshes_name_the_values(self):
    with self.assertRaisesRegex(ValueError, r'mesh.fsdp=3 does not divide'):
      parallel.make_mesh(-1, 3)
    with self.assertRaisesRegex(ValueError, r'mesh.data=3 x mesh.fsdp=2'):
      parallel.make_mesh(3, 2)
    slice_of = {d.id: d.id // 2 for d in jax.devices()}  # 4 slices of 2
    with self.assertRaisesRegex(ValueError, r'not a multiple of the 4 slices'):
      parallel.make_mesh(2, 4, slice_of=lambda d: slice_of[d.id])


if __name__ == '__main__':
  absltest.main()
