"""The front door (issue 42): what a new user meets around the numbers.

Evaluation records that accumulate, help that exits 0, one line per bad
input, quiet logs on several processes, interop that keeps the step.
"""

import contextlib
import glob
import importlib.util
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys

import numpy as np
import portpicker
import pytest
import tiny_config
import torch
from PIL import Image
from test_cli import ROOT, TINY, env
from test_eval_cli import error_lines, run_in_process, tiny_workdir

from dino_jax import checkpoint as checkpoint_lib
from dino_jax import config as config_lib
from dino_jax import interop, interrupt
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib
from dino_jax.cli import console, evals
from dino_jax.cli import flags as cli_flags
from dino_jax.evaluation import (
  attention,
  knn,
)
from dino_jax.evaluation import common as eval_common
from dino_jax.evaluation import run as eval_run

OFFICIAL = os.path.join(os.path.dirname(ROOT), 'shared', 'official-dino')


def _official_utils():
  spec = importlib.util.spec_from_file_location(
    'official_dino_utils', os.path.join(OFFICIAL, 'utils.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _in_process(module, argv):
  """(status, stdout, stderr) of an evaluation CLI run in this process."""
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    status, stderr = run_in_process(module, argv)
  return status, stdout.getvalue(), stderr


# --- 1. evaluation results accumulate --------------------------------------


def test_knn_cli_adds_a_record_and_keeps_the_baselines(tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny_workdir(workdir)
  config.eval.baselines = True
  config.eval.attention_images = 0
  loaded, mesh, state, step = workdir_lib.load_workdir(workdir)
  # The end of training (evaluation.run), then the CLI with other settings.
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    eval_run.after_training(config, workdir, mesh, state, step)
  with open(os.path.join(workdir, 'eval', 'knn.json')) as f:
    first = json.load(f)
  status, cli_out, stderr = _in_process(
    knn, [f'--workdir={workdir}', '--config.eval.ks=(3,)']
  )
  assert status == 0, stderr
  # The same title from training and from the CLI.
  assert 'k-NN trained (step 0):' in stdout.getvalue()
  assert 'k-NN trained (step 0):' in cli_out
  assert 'settings: --config.eval.ks=(3,)\n' in cli_out  # not quietly
  with open(os.path.join(workdir, 'eval', 'knn.json')) as f:
    latest = json.load(f)
  assert set(latest['trained']) == {'3'}
  # The baselines the training run wrote are still there, unchanged.
  for name in ('random_init', 'raw_pixels'):
    assert latest[name] == first[name]
  records = eval_common.read_records(workdir, 'knn')
  assert [r['settings']['eval']['ks'] for r in records] == [[2, 4], [3]]
  assert [set(r['results']) for r in records] == [
    {'step', 'trained', 'random_init', 'raw_pixels'},
    {'step', 'trained'},
  ]
  assert all(r['step'] == 0 and r['time'] for r in records)
  # Each record holds what was printed: the numbers of its own run.
  row = re.search(r'\n\s+3\s+(\d+\.\d\d)', cli_out)
  assert records[1]['results']['trained']['3']['top1'] == pytest.approx(
    float(row.group(1)), abs=0.005
  )
  # Another run adds a record and erases none.
  status, _, stderr = _in_process(knn, [f'--workdir={workdir}'])
  assert status == 0, stderr
  assert len(glob.glob(os.path.join(workdir, 'eval', 'records', '*'))) == 3


def test_an_imported_backbone_is_titled_by_its_file(tmp_path):
  workdir = str(tmp_path / 'imported')
  config = tiny_config.get_config()
  source = str(tmp_path / 'backbone.pth')
  # A released-style backbone file: the tiny model's random init.
  student_m, _, init_fn = step_lib.state_template(config)
  state = init_fn()
  weights = interop.to_pytorch(
    {'params': state.teacher['backbone']}, student_m.backbone
  )
  torch.save(
    {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, source
  )
  interop.import_checkpoint(source, workdir, config)
  assert knn.title(workdir, 0) == 'k-NN trained (imported backbone.pth, step 0)'
  assert knn.title(workdir, 5) == 'k-NN trained (step 5)'  # trained since
  assert knn.title(str(tmp_path), 0) == 'k-NN trained (step 0)'


# --- 2. several processes --------------------------------------------------


def _two_processes(workdir, *overrides, timeout=300):
  return subprocess.run(
    ['bash', 'launch/local.sh', TINY, workdir, *overrides],
    env={**env(), 'NUM_PROCESSES': '2'},
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=ROOT,
  )


def test_an_error_line_is_one_write_prefixed_or_not(monkeypatch):
  # Two processes share launch/local.sh's stderr: a line written as text,
  # then its newline (print), could take the other's line onto it.
  from dino_jax.cli import console

  class Writes(io.StringIO):
    calls = []

    def write(self, text):
      self.calls.append(text)
      return super().write(text)

  raw = Writes()
  for stream, want in (
    (raw, 'error: bad\n'),
    (console._PrefixedLines(raw, '[process 1] '), '[process 1] error: bad\n'),
  ):
    Writes.calls.clear()
    monkeypatch.setattr(sys, 'stderr', stream)
    console.say('error: bad')
    assert Writes.calls == [want]


def test_two_processes_print_each_error_once_prefixed(tmp_path):
  # Both processes fail on the data; process 0 says it, process 1 says it
  # with its index; neither adds an absl E line.
  result = _two_processes(
    str(tmp_path / 'w'),
    '--config.data.source=imagefolder',
    f'--config.data.path={tmp_path}/nothing',
  )
  assert result.returncode != 0
  errors = [
    line
    for line in result.stderr.splitlines()
    if re.match(r'(\[process \d\] )?error:', line)
  ]
  assert sorted(e.split('error:')[0] for e in errors) == ['', '[process 1] ']
  assert not re.search(r'^(\[process \d\] )?E\d{4} ', result.stderr, re.M)
  # Process 0 says what it starts at once (before: 52 s of silence).
  assert result.stderr.splitlines()[0].startswith(
    'dino_jax.main: vit_small on imagefolder in '
  )
  assert result.stderr.count('dino_jax.main: ') == 1
  assert 'process 0/2' in result.stderr  # process 0's INFO lines
  assert 'process 1/2' not in result.stderr


@pytest.mark.slow
def test_two_processes_print_info_and_tables_once(tmp_path):
  # python -m dino_jax.eval.knn on 2 processes (as on a pod): process 0
  # prints the table and the INFO lines, process 1 nothing of it.
  workdir = str(tmp_path / 'run')
  tiny_workdir(workdir)
  port = portpicker.pick_unused_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'dino_jax.eval.knn',
        f'--workdir={workdir}',
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ],
      env=env(),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  (out0, err0), (out1, err1) = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], err0[-2000:] + err1[-2000:]
  assert out0.count('k-NN trained (step 0):') == 1
  assert 'k-NN (trained): 64 memory' in err0
  assert 'Connecting to JAX distributed service' in err0
  assert 'k-NN' not in out1 + err1
  # Before: every INFO line twice (JAX's distributed start included).
  assert not re.search(r'^I\d{4} ', err1, re.M), err1[-2000:]


def test_quiet_other_processes_drops_info_and_prefixes(monkeypatch):
  stderr = io.StringIO()
  monkeypatch.setattr(sys, 'stderr', stderr)
  monkeypatch.setattr(sys, 'stdout', sys.stdout)
  monkeypatch.setattr(console, '_quieted', False)
  handler = logging.StreamHandler(stderr)
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    console.quiet_other_processes(1, 2)
    print('a table')
    logging.getLogger('dino_jax.x').warning('careful')
    logging.getLogger('dino_jax.x').info('progress')
    print('error: bad', file=sys.stderr)
  finally:
    root.removeHandler(handler)
    for h in root.handlers:  # the filter quiet_other_processes added
      for f in [f for f in h.filters if isinstance(f, console._ProcessPrefix)]:
        h.removeFilter(f)
    sys.stdout.close()
  assert stderr.getvalue() == '[process 1] careful\n[process 1] error: bad\n'


# --- 3. bad inputs ---------------------------------------------------------


def test_local_sh_without_arguments_prints_its_usage():
  result = subprocess.run(
    ['bash', 'launch/local.sh'], capture_output=True, text=True, cwd=ROOT
  )
  assert result.returncode == 2
  assert result.stderr.startswith('error: expected a config file and a ')
  assert 'usage: [NUM_PROCESSES=N] bash launch/local.sh' in result.stderr
  assert len(result.stderr.splitlines()) == 1


def test_attention_size_follows_the_config(tmp_path):
  workdir = str(tmp_path / 'run')
  tiny_workdir(workdir)
  image = str(tmp_path / 'cat.png')
  Image.fromarray(np.full((50, 60, 3), 90, np.uint8)).save(image)
  out = str(tmp_path / 'maps')
  sizes = {}
  for extra in ([], ['--config.eval.attention_size=24']):
    status, stdout, stderr = _in_process(
      attention,
      [f'--workdir={workdir}', f'--image={image}', f'--output_dir={out}']
      + extra,
    )
    assert status == 0, stderr
    png = [p for p in stdout.split() if p.endswith('cat-head0.png')][0]
    sizes[tuple(extra)] = Image.open(png).size
  # tiny: eval.crop_size 32; eval.attention_size wins when set.
  assert sizes == {(): (32, 32), ('--config.eval.attention_size=24',): (24, 24)}
  status, _, stderr = _in_process(
    attention, [f'--workdir={workdir}', f'--image={image}', '--image_size=-1']
  )
  assert status == 1
  assert error_lines(stderr) == [
    'error: --image_size=-1 is negative; pass a side in pixels, or 0 for '
    "the config's eval.attention_size"
  ]


def test_evaluation_tools_answer_a_signal_without_saving(caplog):
  def main(values, args, overrides):
    os.kill(os.getpid(), signal.SIGINT)
    interrupt.check()

  with caplog.at_level(logging.WARNING, logger='dino_jax.cli.signals'):
    status, stderr = run_in_process(knn, ['--workdir=w'], main)
  assert status == 130
  assert stderr.strip() == 'interrupted'
  assert [r.getMessage() for r in caplog.records] == [
    'SIGINT: stopping at the next batch; nothing partial is written'
  ]


def test_demo_config_sets_what_the_momentum_warning_asks():
  spec = importlib.util.spec_from_file_location(
    'fashion_mnist_config', os.path.join(ROOT, 'configs', 'fashion_mnist.py')
  )
  fashion = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fashion)
  small = tiny_config.get_config()  # batch 8, the default momentum
  for variant in fashion.VARIANTS:
    assert config_lib.advice(fashion.get_config(variant)) == [], variant
  lines = config_lib.advice(small)
  assert ['momentum_teacher' in line for line in lines] == [True]


# --- 4. interop keeps the step ---------------------------------------------


def test_full_export_keeps_the_step_and_import_resumes_there(tmp_path):
  workdir, again = str(tmp_path / 'run'), str(tmp_path / 'again')
  config = tiny_config.get_config()  # 64 images / batch 8: 8 steps an epoch
  _, _, init_fn = step_lib.state_template(config)
  state = init_fn()
  state = state.replace(step=np.asarray(11, np.int32))
  ckpt = checkpoint_lib.Checkpointer(f'{workdir}/checkpoints', async_save=False)
  ckpt.save(11, state, config)
  ckpt.wait()
  ckpt.close()
  path = str(tmp_path / 'full.pth')
  status, stderr = run_in_process(
    interop, ['export', workdir, path, '--what=full']
  )
  assert status == 0, stderr
  # The official loader reads the epoch (mid-epoch 1) and ignores the step.
  utils = _official_utils()
  run_variables = {'epoch': None}
  with contextlib.redirect_stdout(io.StringIO()):
    utils.restart_from_checkpoint(path, run_variables=run_variables)
  assert run_variables == {'epoch': 1}
  assert torch.load(path, weights_only=False)['dino_jax_step'] == 11
  config_file = str(tmp_path / 'tiny.py')
  with open(TINY) as f:
    open(config_file, 'w').write(f.read())
  status, stderr = run_in_process(
    interop, ['import', path, again, f'--config={config_file}']
  )
  assert status == 0, stderr
  _, _, restored, step = workdir_lib.load_workdir(again)
  assert step == int(restored.step) == 11
  assert workdir_lib.imported_from(again)['step'] == 11


# --- 5. help ---------------------------------------------------------------


@pytest.mark.parametrize('name', [*evals.NAMES, 'interop'])
def test_tool_help_exits_0_with_the_common_flags(name):
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    if name == 'interop':
      status = cli_flags.run_cli(
        interop.define_flags, interop.main, ['prog', '-h']
      )
    else:  # python -m dino_jax.eval.<name>: the command is the shell's
      status = evals.run(name, ['prog', '-h'])
  text = stdout.getvalue()
  assert status == 0
  program = interop.__name__ if name == 'interop' else f'dino_jax.eval.{name}'
  _check_help(text, program)
  assert '  --workdir' in text or name == 'interop'


def _check_help(text, name):
  usage, _, example = console.TOOLS[name]
  assert text.startswith(f'usage: {usage}\n')
  config_parts = ('--config.a.b=c', ':cpu', ':gpu', ':parity')
  if name in console.NO_CONFIG_TOOLS:  # plot reads no config
    assert not any(part in text for part in config_parts), name
  else:
    for part in config_parts:
      assert part in text, (name, part)
  assert example in text, name
  assert all(len(line) <= 80 for line in text.splitlines()[1:-1]), name


def test_main_aot_and_plot_help_exit_0():
  procs = {
    name: subprocess.Popen(
      [sys.executable, '-m', name, arg],
      env=env(),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for name, arg in (
      ('dino_jax.main', '--help'),
      ('dino_jax.aot', '-h'),
      ('dino_jax.plot', '-h'),
    )
  }
  own = {
    'dino_jax.main': '  --workdir',
    'dino_jax.aot': '  --topology',
    'dino_jax.plot': '  --k=20',
  }
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (name, err[-2000:])
    _check_help(out, name)
    assert own[name] in out, name


def test_records_read_oldest_first_within_one_second(tmp_path):
  # Records whose 'time' (seconds) ties: the order is the order written (the
  # name's microsecond stamp). Before: sorted by 'time' only, so ties came in
  # the directory's order (test_knn_cli_adds_a_record... failed at random).
  workdir = str(tmp_path)
  for i in range(20):
    eval_common.write_record(workdir, 'knn', {'step': i, 'i': i})
  records = eval_common.read_records(workdir, 'knn')
  assert len({r['time'] for r in records}) < 20  # some ties at least
  assert [r['results']['i'] for r in records] == list(range(20))
  assert eval_common.read_records(workdir, 'linear') == []
