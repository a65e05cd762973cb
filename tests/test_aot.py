"""``python -m dino_jax.aot``: compiles for hardware this machine lacks.

The TPU tests compile the tiny config for TPU v5e chips through libtpu
(``pip install -e '.[tpu]'``) in real subprocesses of the CLI, and are
skipped, saying so, where libtpu is absent; the GPU one needs the CUDA
plugin (``'.[aot-gpu]'``). The rest reads HLO text and messages and runs
always.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from dino_jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'tests', 'tiny_config.py')
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None


# A folder holding the CUDA plugin apart from the environment (.ci/run
# installs it there with pip --target): only the GPU compiles load it, so
# no other test's process starts with it.
CUDA_PLUGIN_PATH = os.environ.get('DINO_JAX_TEST_CUDA_PLUGIN', '')


def _has_cuda_plugin() -> bool:
  if CUDA_PLUGIN_PATH and os.path.isdir(
    os.path.join(CUDA_PLUGIN_PATH, 'jax_plugins', 'xla_cuda12')
  ):
    return True
  try:
    return importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
  except ModuleNotFoundError:  # no jax_plugins namespace at all
    return False


HAS_CUDA_PLUGIN = _has_cuda_plugin()
# The environment of a GPU compile: the plugin's folder on the path.
CUDA_ENV = (
  {
    'PYTHONPATH': os.pathsep.join(
      p for p in (CUDA_PLUGIN_PATH, os.environ.get('PYTHONPATH')) if p
    )
  }
  if CUDA_PLUGIN_PATH
  else {}
)
needs_libtpu = pytest.mark.skipif(
  not HAS_LIBTPU,
  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compile",
)
needs_cuda_plugin = pytest.mark.skipif(
  not HAS_CUDA_PLUGIN,
  reason="the CUDA plugin is not installed (pip install -e '.[aot-gpu]', "
  'or DINO_JAX_TEST_CUDA_PLUGIN=a pip --target folder of it, as .ci/run '
  'does): no GPU compile',
)


def run_aot(
  *args: str, env: dict | None = None, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
  """``python -m dino_jax.aot --config=tests/tiny_config.py ARGS``."""
  environ = {k: v for k, v in os.environ.items() if k not in unset}
  # The TPU compiler ignores XLA:CPU's flags; the test suite's fake CPU
  # devices (conftest.py) would only slow the start.
  environ.pop('XLA_FLAGS', None)
  environ.update(env or {})
  return subprocess.run(
    [sys.executable, '-m', 'dino_jax.aot', f'--config={TINY}', *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=environ,
    timeout=900,
  )


def last_line(text: str) -> str:
  return text.strip().splitlines()[-1]


# --- always: targets, HLO reading, messages --------------------------------


def test_parse_topology():
  t = aot.parse_topology('v5e:4x8', slices=2)
  assert (t.gen, t.shape, t.num_devices) == ('v5e', (4, 8), 64)
  assert aot.parse_topology('h100:8').num_devices == 8
  assert aot.parse_topology('v4:2x2x2').chip.memory_gib == 30.75
  for bad in ('v9:2x2', 'v5e', 'v5e:0x2', 'tpu-v5e-16'):
    with pytest.raises(aot.AotError, match='unknown topology'):
      aot.parse_topology(bad)
  with pytest.raises(aot.AotError, match='without --slices'):
    aot.parse_topology('h100:8', slices=2)


def test_collectives_counts_results_once():
  hlo = '\n'.join(
    [
      '  %all-reduce.1 = f32[1024]{0} all-reduce(f32[1024]{0} %x)',
      '  %all-reduce.2 = (f32[10]{0}, bf16[6]{0}) all-reduce(%a, %b)',
      '  %all-gather.3 = bf16[8,128]{1,0} all-gather(bf16[2,128]{1,0} %p)',
      '  %ags = (bf16[2,64]{1,0}, bf16[8,64]{1,0}) all-gather-start(%q)',
      '  %agd = bf16[8,64]{1,0} all-gather-done(%ags)',
      '  ROOT %rs = f32[4,4]{1,0} reduce-scatter(f32[16,4]{1,0} %g)',
      '  %cp = (f32[3]{0}, f32[3]{0}, u32[]) collective-permute-start(%c)',
      '  %f = f32[1024]{0} fusion(%all-reduce.1), kind=kLoop',
      # XLA:GPU's async reduce-scatters, as compiled.as_text() prints them:
      # ((operands), results); the results are the shares.
      '  %rss = ((f32[64]{0}), f32[32]{0}) reduce-scatter-start(%r), dimensions'
      '={0}',
      '  %rsd = f32[32]{0} reduce-scatter-done(%rss)',
      '  %rs2 = ((bf16[32]{0}, bf16[96,32]{1,0}), (bf16[16]{0}, bf16[48,32]{1,'
      '0})) reduce-scatter-start(%s, %t), dimensions={0}',
    ]
  )
  assert aot.collectives(hlo) == {
    'all-reduce': {'count': 2, 'bytes': 4096 + 40 + 12},
    'all-gather': {'count': 2, 'bytes': 8 * 128 * 2 + 8 * 64 * 2},
    'reduce-scatter': {'count': 3, 'bytes': 64 + 32 * 4 + (16 + 48 * 32) * 2},
    'collective-permute': {'count': 1, 'bytes': 12},
  }


def test_bytes_accessed_come_from_the_compiled_program():
  # A matmul reads both operands once and writes its result once: XLA's
  # 'bytes accessed' of the compiled program is exactly those bytes (the
  # CPU backend's cost analysis, the same HloCostAnalysis as the TPU's).
  a = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  b = jax.ShapeDtypeStruct((32, 16), jnp.float32)
  compiled = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
  cost = aot.xla_cost(compiled)
  assert cost['bytes'] == (64 * 32 + 32 * 16 + 64 * 16) * 4
  assert cost['flops'] == 2 * 64 * 32 * 16


def test_roofline_takes_the_lower_bound():
  v5e = aot.CHIPS['v5e']
  # The ViT-S/16 step on v5e: 113 GFLOPs, 3.5 GB per image.
  r = aot.roofline(v5e, 113e9, 3.5e9, 0.35)
  assert r['compute'] == pytest.approx(197e12 * 0.35 / 113e9)  # 610
  assert r['memory'] == pytest.approx(819e9 / 3.5e9)  # 234
  assert (r['images_per_second'], r['bound']) == (r['memory'], 'memory')
  # Above the chip's ridge (197e12 / 819e9 = 241 FLOPs per byte at 100 %
  # MFU, 84 at 35 %) the compute bound holds.
  assert v5e.ridge == pytest.approx(240.5, abs=0.1)
  r = aot.roofline(v5e, 113e9, 113e9 / 100, 0.35)
  assert r['bound'] == 'compute' and r['images_per_second'] == r['compute']
  assert aot.roofline(v5e, 113e9, None, 0.35) == {
    'compute': pytest.approx(610.2, abs=0.1),
    'memory': None,
    'images_per_second': pytest.approx(610.2, abs=0.1),
    'bound': 'compute',
  }


def test_chip_bandwidths():
  # The GPUs' datasheet bandwidths agree with XLA's descriptions of them.
  for gen, target in aot.GPU_TARGETS.items():
    assert aot.CHIPS[gen].bandwidth_gbps * 1e9 == pytest.approx(
      target['memory_bandwidth'], rel=0.005
    )
  for chip in aot.CHIPS.values():
    assert chip.bandwidth_source and 500 < chip.bandwidth_gbps < 5000


def test_report_prints_the_memory_roofline():
  report = {
    'topology': 'v5e:4x4',
    'slices': 1,
    'chip': 'TPU v5e',
    'platform': 'tpu',
    'devices': 16,
    'mesh': {'data': 16, 'fsdp': 1},
    'arch': 'vit_small',
    'patch_size': 16,
    'dtype': 'bfloat16',
    'attention': 'fused',
    'remat': False,
    'batch_size': 1024,
    'compile_seconds': 900.0,
    'memory': {
      'arguments': 0,
      'outputs': 0,
      'aliased': 0,
      'temporaries': 0,
      'code': 0,
      'peak': 11 * 2**30,
    },
    'memory_limit_bytes': 15.75 * 2**30,
    'fits': True,
    'flops_per_image': 113e9,
    'flops_per_device': 113e9 * 64,
    'xla_flops_per_image': 117.5e9,
    'xla_flops_per_device': 117.5e9 * 64,
    'xla_bytes_per_image': 3.5e9,
    'xla_bytes_per_device': 3.5e9 * 64,
    'peak_tflops': 197.0,
    'peak_source': 'v5e page',
    'bandwidth_gbps': 819.0,
    'bandwidth_source': 'v5e page',
    'mfu': 0.35,
    'images_per_second_per_device': 610.2,
    'roofline': aot.roofline(aot.CHIPS['v5e'], 113e9, 3.5e9, 0.35),
    'host_peak_bytes': 2**30,
  }
  lines = aot.format_report(report).splitlines()
  assert (
    'bytes accessed (XLA): 3.5 GB per image, 224 GB per device per step; '
    '33.6 FLOPs per byte (compute-bound above 241 on this chip)'
  ) in lines
  assert (
    'memory bound: 234 images/s per device at 819 GB/s HBM per chip (v5e page)'
  ) in lines
  assert (
    'roofline: 234 images/s per device (3744 in all), memory-bound'
  ) in lines
  assert lines[1].startswith('model: vit_small/16, bfloat16, fused attention,')
  # A ResNet has no patches and no attention.
  lines = aot.format_report({**report, 'arch': 'resnet50'}).splitlines()
  assert lines[1] == 'model: resnet50, bfloat16, remat False; global batch 1024'


def test_collectives_count_the_tpu_reduce_scatter_fusion_once():
  # libtpu's reduce-scatter, as in the tiny step's program for v5e:2x4 at
  # data 4 x fsdp 2: a fusion calling %all-reduce-scatter.N, whose body is
  # an all-reduce of the whole gradients and each device's slice of them.
  hlo = '\n'.join(
    [
      '%all-reduce-scatter.3 (input_0: f32[32,32], input_2: f32[64,64]) -> '
      '(f32[16,32], f32[32,64]) {',
      '  %all-reduce.171 = (f32[32,32]{1,0:T(8,128)}, f32[64,64]{1,0}) '
      'all-reduce(%input_0, %input_2), channel_id=1, '
      'replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add',
      '  %ds = f32[16,32]{1,0} dynamic-slice(%gte, %i, %j)',
      '  ROOT %t = (f32[16,32]{1,0}, f32[32,64]{1,0}) tuple(%ds, %ds2)',
      '}',
      '',
      'ENTRY %main.0_spmd (param: f32[8,512]) -> f32[16,32] {',
      '  %fusion.1045 = (f32[16,32]{1,0:T(8,128)S(1)}, f32[32,64]{1,0}) '
      'fusion(%a, %b), kind=kCustom, calls=%all-reduce-scatter.3, '
      'backend_config={"collective_algorithm_config":{"emitter":'
      '"SingleInputAllReduceScatterFusion"}}',
      '  ROOT %all-reduce.1 = f32[16,32]{1,0} all-reduce(%gte), '
      'channel_id=4, to_apply=%add.1',
      '}',
    ]
  )
  assert aot.collectives(hlo) == {
    'reduce-scatter': {'count': 1, 'bytes': (16 * 32 + 32 * 64) * 4},
    'all-reduce': {'count': 1, 'bytes': 16 * 32 * 4},
  }


def test_hbm_needed_from_the_tpu_message():
  message = (
    'RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory '
    'in memory space hbm. Used 92.80G of 15.75G hbm. Exceeded hbm capacity '
    'by 77.05G.'
  )
  assert aot.hbm_needed(message) == pytest.approx(92.80 * 2**30)
  temporaries = (
    'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required '
    'for HLO temporaries (25.01G) exceeds available HBM (15.75G).'
  )
  assert aot.hbm_needed(temporaries, 2**30) == pytest.approx(26.01 * 2**30)
  assert aot.hbm_needed('RESOURCE_EXHAUSTED: something else') is None


def test_verdict_lines():
  base = {
    'memory_limit_bytes': 16 * 2**30,
    'mesh': {'data': 8, 'fsdp': 1},
    'devices': 8,
    'slices': 1,
    'remat': False,
  }
  fits = {**base, 'fits': True, 'memory': {'peak': 6 * 2**30}}
  assert aot.verdict(fits) == 'fits (6.00 of 16.00 GiB per device)'
  over = {**base, 'fits': False, 'needed_bytes': 20 * 2**30}
  assert aot.verdict(over) == (
    'does not fit: needs 20.00 GiB of 16.00 per device; try mesh.fsdp=2, '
    'model.remat=True, a smaller batch'
  )
  features = {
    **base,
    'fits': False,
    'memory': {'peak': 6 * 2**30},
    'features': {'memory': {'peak': 17 * 2**30}},
  }
  assert aot.verdict(features) == (
    "does not fit: the evaluation's feature function needs 17.00 GiB of "
    '16.00 per device; try a smaller eval.batch_size'
  )


def test_gpu_target_config_text():
  text = aot.gpu_target_config('h100')
  assert 'core_count: 132' in text
  assert 'device_memory_size: 84942979072' in text
  assert (
    'major: 9' in text and 'feature_extension: ACCELERATED_FEATURES' in text
  )
  assert text.count('{') == text.count('}')
  # The chip table's memory and the target description agree.
  for gen, target in aot.GPU_TARGETS.items():
    assert aot.CHIPS[gen].memory_gib * 2**30 == target['device_memory_size']


def test_missing_libtpu_names_the_extra(tmp_path):
  # A libtpu that fails to import, ahead of any installed one.
  shadow = tmp_path / 'libtpu'
  shadow.mkdir()
  (shadow / '__init__.py').write_text('raise ImportError("no libtpu")\n')
  result = run_aot(
    '--topology=v5e:2x2',
    env={'PYTHONPATH': f'{tmp_path}{os.pathsep}{ROOT}'},
    # Where JAX found libtpu when this process imported it.
    unset=('TPU_LIBRARY_PATH',),
  )
  assert result.returncode == 1, result.stderr
  assert last_line(result.stderr) == (
    "error: compiling for TPU v5e needs libtpu: pip install -e '.[tpu]'"
  )


def test_unknown_topology_one_line():
  result = run_aot('--topology=v9:2x2')
  assert result.returncode == 1
  assert result.stderr.strip().startswith("error: unknown topology 'v9:2x2'")
  assert len(result.stderr.strip().splitlines()) == 1


# The config is checked against the target's device count before libtpu or
# the CUDA plugin loads: these run without either.


def test_mesh_that_does_not_divide_the_devices():
  result = run_aot('--topology=v5e:2x2', '--config.mesh.fsdp=3')
  assert result.returncode == 1
  assert result.stderr.strip() == (
    'error: v5e:2x2 (4 devices): mesh.fsdp=3 does not divide the 4 devices'
  )


def test_eval_batch_not_divisible_one_line():
  # Unchecked: JAX's IndivisibleError traceback after the step's compile
  # (config.validate's check, which training makes too).
  result = run_aot('--topology=v5e:2x2', '--config.eval.batch_size=250')
  assert result.returncode == 1
  assert result.stderr.strip() == (
    'error: v5e:2x2 (4 devices): eval.batch_size=250 is not a multiple of '
    'the 4 devices (the evaluation splits it over them); use '
    '--config.eval.batch_size=248 or 252'
  )
  result = run_aot('--topology=h100:8', '--config.eval.batch_size=4')
  assert result.returncode == 1
  assert result.stderr.strip() == (
    'error: h100:8 (8 devices): eval.batch_size=4 is not a multiple of the '
    '8 devices (the evaluation splits it over them); use '
    '--config.eval.batch_size=8'
  )


# --- with libtpu: real compiles for TPU v5e ---------------------------------


@needs_libtpu
def test_tiny_config_fits_v5e_2x2(tmp_path):
  out = tmp_path / 'report.json'
  result = run_aot(
    '--topology=v5e:2x2',
    '--config.mesh.fsdp=2',
    '--config.mesh.fsdp_min_size=1024',
    '--config.model.dtype=auto',
    '--config.model.attention=auto',
    f'--out={out}',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0] == ('target: v5e:2x2, 4 x TPU v5e; mesh data 2 x fsdp 2'), (
    lines
  )
  assert lines[-1].startswith('fits (') and lines[-1].endswith(
    ' of 15.75 GiB per device)'
  ), lines[-1]
  report = json.loads(out.read_text())
  assert report['fits'] is True
  # model.attention='auto' is einsum on a TPU (docs/bytes.md: fewer bytes
  # than XLA's fused attention there), fused on a GPU.
  assert (report['dtype'], report['attention']) == ('bfloat16', 'einsum')
  assert report['mesh'] == {'data': 2, 'fsdp': 2}
  # Each device computes its quarter of the batch: XLA's count per device
  # times 4 is 1.6x the analytic matmul count (XLA also counts the
  # elementwise work and the augmentation, large at this size); a device
  # that computed the whole batch would make it 4x that, 6.4.
  ratio = report['xla_flops_per_image'] / report['flops_per_image']
  assert 1.0 <= ratio < 2.0, ratio
  assert 0 < report['memory']['peak'] < 2**30
  # XLA's bytes of the compiled program: the step reads at least the
  # state it is given (arguments) and writes the new one; the roofline
  # is the lower of its two bounds.
  moved = report['xla_bytes_per_device']
  assert moved > report['memory']['arguments'] + report['memory']['outputs']
  assert report['xla_bytes_per_image'] == pytest.approx(moved * 4 / 8)
  roof = report['roofline']
  assert roof['memory'] == pytest.approx(819e9 / report['xla_bytes_per_image'])
  assert roof['images_per_second'] == min(roof['compute'], roof['memory'])
  roofline_line = next(x for x in lines if x.startswith('roofline: '))
  assert roofline_line.endswith(f'{roof["bound"]}-bound'), roofline_line
  # fsdp gathers parameters and the gradients are all-reduced; some split
  # gradients are reduce-scattered (libtpu's all-reduce-scatter fusion,
  # which the reader counted as a full-size all-reduce before: issue 40).
  assert report['collectives']['all-gather']['count'] > 0
  assert report['collectives']['all-reduce']['bytes'] > 0
  assert report['collectives']['reduce-scatter']['count'] >= 1
  assert report['features']['memory']['peak'] > 0


@needs_libtpu
def test_oversized_head_does_not_fit():
  # K = 2^26 prototypes: the head's last layer is 4 GiB in float32, so
  # student, teacher and the two Adam moments alone exceed a v5e's HBM. (An
  # oversized batch is refused as well, but only after minutes of the
  # compiler's rematerialization attempts: over 13 min for the tiny config
  # at batch 8192 on 2 busy cores.)
  result = run_aot(
    '--topology=v5e:2x2',
    '--noeval_features',
    '--config.model.out_dim=67108864',
  )
  assert result.returncode == 1, result.stderr[-3000:]
  line = last_line(result.stdout)
  assert line.startswith('does not fit: needs '), line
  assert line.endswith(
    'GiB of 15.75 per device; try mesh.fsdp=2, model.remat=True, a smaller '
    'batch'
  ), line


@needs_libtpu
def test_two_slices_stack_on_data(tmp_path):
  out = tmp_path / 'report.json'
  result = run_aot(
    '--topology=v5e:2x2',
    '--slices=2',
    '--config.mesh.fsdp=4',
    '--noeval_features',
    f'--out={out}',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  first = result.stdout.strip().splitlines()[0]
  assert first == (
    'target: v5e:2x2 x 2 slices, 8 x TPU v5e; mesh data 2 x fsdp 4'
  ), first
  report = json.loads(out.read_text())
  assert report['fits'] is True and report['devices'] == 8
  # Each data row (an fsdp group) lies in one slice; the slices stack.
  assert report['mesh_slices'] == [[0, 0, 0, 0], [1, 1, 1, 1]]


# --- with the CUDA plugin: a compile for 8 x H100 without a GPU --------------


@needs_cuda_plugin
def test_tiny_config_on_h100(tmp_path):
  out = tmp_path / 'report.json'
  result = run_aot(
    '--topology=h100:8',
    '--config.model.dtype=auto',
    '--config.model.attention=auto',
    f'--out={out}',
    env=CUDA_ENV,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert last_line(result.stdout).startswith('fits (')
  assert last_line(result.stdout).endswith(' of 59.33 GiB per device)')
  report = json.loads(out.read_text())
  assert (report['dtype'], report['attention']) == ('bfloat16', 'fused')
  assert report['mesh'] == {'data': 8, 'fsdp': 1}


@needs_cuda_plugin
def test_oversized_head_on_h100_does_not_fit():
  # K = 2^27: 8 GiB a copy of the last layer (student, teacher, two Adam
  # moments) and [rows, K] logits; at batch 8 the peak was 50.5 GiB (fits),
  # at batch 64 it is over 0.75 x 80 GB. XLA:GPU compiles it anyway; the
  # verdict compares its peak with that.
  result = run_aot(
    '--topology=h100:8',
    '--noeval_features',
    '--config.model.out_dim=134217728',
    '--config.batch_size=64',
    env=CUDA_ENV,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert last_line(result.stdout).startswith('does not fit: needs ')


class _FakeCompiled:
  """A compiled step whose peak is 1 GiB + 10 MiB per image (or ``peak``),
  and 1 GFLOP per image."""

  def __init__(self, batch: int, peak=None):
    self.peak = peak(batch) if peak else 2**30 + batch * 10 * 2**20
    self.batch = batch

  def cost_analysis(self):
    return {'flops': self.batch * 1e9}

  def memory_analysis(self):
    return type(
      'Stats',
      (),
      {
        'argument_size_in_bytes': 2**30,
        'output_size_in_bytes': 0,
        'alias_size_in_bytes': 0,
        'temp_size_in_bytes': self.peak - 2**30,
        'generated_code_size_in_bytes': 0,
        'peak_memory_in_bytes': self.peak,
      },
    )()


def test_max_batch_bisection(monkeypatch):
  compiled = []

  def fake_compile(config, mesh, platform):
    compiled.append(config.batch_size)
    return aot.Compiled(1.0, compiled=_FakeCompiled(config.batch_size))

  monkeypatch.setattr(aot.search, 'compile_step', fake_compile)
  config = ml_collections.ConfigDict({'batch_size': 256})
  limit = 16 * 2**30  # (16 GiB - 1 GiB) / 10 MiB = 1536 images fit
  start = 2**30 + 256 * 10 * 2**20
  best, probes = aot.find_max_batch(
    config, None, 'tpu', limit, 64, {256: (True, start, 1.0, None)}
  )
  assert best == 1536
  assert probes[1536][0] and not probes[1600][0]
  assert probes[1536][3] == 1536 * 1e9  # XLA's FLOPs of each probe
  # Doubling once, then the line through the peaks lands on it.
  assert compiled == [512, 1536, 1600]
  # With the state's bytes as the line's point at batch 0, no doubling.
  compiled.clear()
  best, _ = aot.find_max_batch(
    config, None, 'tpu', limit, 64, {256: (True, start, 1.0, None)}, fixed=2**30
  )
  assert best == 1536
  assert compiled == [1536, 1600]


def test_max_batch_flat_peaks_do_not_send_the_search_far(monkeypatch):
  # The compiler rematerializes near the limit: the peak grows 10 MiB per
  # image to 1280, then 1 KiB per image; batches over 20000 do not fit.
  def peak(batch):
    if batch > 20000:
      return 32 * 2**30
    return 2**30 + min(batch, 1280) * 10 * 2**20 + max(batch - 1280, 0) * 1024

  compiled = []

  def fake_compile(config, mesh, platform):
    compiled.append(config.batch_size)
    return aot.Compiled(1.0, compiled=_FakeCompiled(config.batch_size, peak))

  monkeypatch.setattr(aot.search, 'compile_step', fake_compile)
  config = ml_collections.ConfigDict({'batch_size': 256})
  limit = 16 * 2**30
  best, probes = aot.find_max_batch(
    config, None, 'tpu', limit, 64, {256: (True, peak(256), 1.0, None)}
  )
  assert best == 20000 // 64 * 64
  # Halving once the line crept: 15 probes (before: 24, the limit, and
  # not there yet, 64 images a step).
  assert len(compiled) <= 16, compiled
  # Each probe above the batches that fitted is at most 4x the largest of
  # them (the line through 1536's and 1856's peaks meets the limit at
  # about 2.6 million images).
  for i, batch in enumerate(compiled):
    fitted = [b for b in [256, *compiled[:i]] if probes[b][0]]
    assert batch <= 4 * max(fitted), compiled


def _sweep_module():
  spec = importlib.util.spec_from_file_location(
    'aot_sweep', os.path.join(ROOT, 'benchmarks', 'aot_sweep.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_sweep_estimate_pools_rows_of_one_chip():
  sweep = _sweep_module()
  gib = 2**30

  def row(target, devices, peak, fsdp=1):
    return {
      'config': 'vit_s16',
      'target': target,
      'chip': 'TPU v5e',
      'devices': devices,
      'batch_size': 1024,
      'mesh': {'data': devices // fsdp, 'fsdp': fsdp},
      'remat': False,
      'fits': peak <= 16 * gib,
      'memory_limit_bytes': 16 * gib,
      'memory': {
        'arguments': gib,
        'outputs': gib,
        'aliased': gib,
        'temporaries': peak - gib,
        'code': 0,
        'peak': peak,
      },
    }

  # 1 GiB of state, then 0.125 GiB per image per device: 120 images fit.
  small = row('v5e-16', 16, 9 * gib)  # 64 images per device
  large = row('v5e-256', 256, int(1.5 * gib))  # 4 per device
  # Alone: the line from the state at batch 0 (120 per device here too).
  assert sweep.estimated_max_batch(small) == 120 * 16
  # Pooled: the two peaks, in images per device, for both device counts.
  assert sweep.estimated_max_batch(large, [small, large]) == 120 * 256
  # With fsdp the program differs: its own line only (0.75 GiB per image).
  sharded = row('v5e-256', 256, 4 * gib, fsdp=4)
  assert sweep.estimated_max_batch(sharded, [small]) == 20 * 256
  # A --max_batch search on one topology: its batch per device, whatever
  # the line says (the compiler rematerializes near the limit).
  searched = dict(small, max_batch=112 * 16)
  searched['max_batch_probes'] = {
    str(112 * 16): {'fits': True, 'peak_bytes': 15 * gib},
    str(120 * 16): {'fits': False, 'peak_bytes': 17 * gib},
  }
  assert sweep.searched_max_batch(large, [searched, large]) == (
    112 * 256,
    'v5e-16',
  )
  assert sweep.searched_max_batch(large, [small, large]) is None
  assert sweep.searched_max_batch(sharded, [searched]) is None
