"""What a command prints: its help, and its lines on several processes.

Every ``python -m dino_jax.X`` entry point answers ``-h`` / ``--help`` with
``help_text``: what it does, its own flags, the common ones (``--config.x=y``
overrides, the config variants, the multi-process flags) and an example;
exit status 0.

On several processes (``jax.process_count() > 1``) ``quiet_other_processes``
leaves the INFO lines and the tables (stdout) to process 0; the others print
warnings and errors only, each line prefixed with ``[process i]``.
"""

import io
import logging
import os
import sys
import textwrap

from absl import flags

HELP_ARGS = ('-h', '--help', '-help', '--helpshort')

COMMON_HELP = """\
common flags:
  --config.a.b=c  override one config field (every field, with its official
      default: dino_jax/config.py); reading a workdir, only eval.*, linear.*,
      data.* and mesh.* may change
  --config=FILE[:VARIANT]  a config file, and its variant:
      configs/fashion_mnist.py:cpu (the default), :gpu, :parity, :resnet;
      configs/vit_s16.py:smoke, configs/resnet50.py:smoke (two steps on
      synthetic data), configs/resnet50.py:released (its released head)
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
      several processes without TPU/SLURM auto-detection
  --helpfull  every flag, absl's included
  JAX_PLATFORMS=cpu  run on the CPU although a GPU or TPU is present"""

# The common block of the tools that read no config (plot: a workdir's files).
NO_CONFIG_HELP = """\
common flags:
  --helpfull  every flag, absl's included"""
NO_CONFIG_TOOLS = ('dino_jax.plot',)


def wants_help(argv: list[str]) -> bool:
  """Whether the command line asks for help (``-h``, ``--help``)."""
  return any(a in HELP_ARGS for a in argv[1:])


def flag_lines(values: flags.FlagValues, names: list[str]) -> list[str]:
  """``--name=default  help`` for each flag of ``names``, sorted."""
  lines = []
  for name in sorted(names):
    flag = values[name]
    default = (flag.default_as_str or '').strip("'")
    shown = f'--{name}' + (f'={default}' if default else '')
    text = f'{shown}  {" ".join(flag.help.split())}'
    lines.append(
      textwrap.fill(text, 78, initial_indent='  ', subsequent_indent='      ')
    )
  return lines


def help_text(
  usage: str,
  summary: str,
  values: flags.FlagValues,
  names: list[str],
  example: str,
  common: str = COMMON_HELP,
) -> str:
  """The ``--help`` of an entry point.

  Args:
    usage: the command line's shape, ``python -m dino_jax.X ...``.
    summary: what the command does, a few lines.
    values: the FlagValues holding the command's flags.
    names: the command's own flags (shown with their defaults).
    example: one command that works.
    common: the common flags' block.
  """
  return '\n'.join(
    [
      f'usage: {usage}',
      '',
      summary.strip(),
      '',
      'flags:',
      *flag_lines(values, names),
      '',
      common,
      '',
      'example:',
      f'  {example}',
    ]
  )


def print_help(text: str) -> None:
  """Prints ``text`` and exits 0."""
  print(text, flush=True)
  sys.exit(0)


# Set to 1, every process prints its INFO lines and tables too (prefixed):
# for debugging a multi-host run, and for the tests that check what each
# process did.
ALL_PROCESSES_VARIABLE = 'DINO_JAX_LOG_ALL_PROCESSES'


class _ProcessPrefix(logging.Filter):
  """Drops INFO and below (unless ``keep_info``); prefixes the rest with
  ``[process i]``."""

  def __init__(self, index: int, keep_info: bool = False):
    super().__init__()
    self.prefix = f'[process {index}] '
    self.keep_info = keep_info

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.WARNING and not self.keep_info:
      return False
    if not getattr(record, 'process_prefixed', False):
      record.msg = f'{self.prefix}{record.msg}'
      record.process_prefixed = True
    return True


def say(line: str) -> None:
  """``line`` on stderr in one write, newline included.

  ``print(line, file=sys.stderr)`` writes the text and the newline apart:
  two processes sharing one pipe (launch/local.sh) could put their lines
  on one (seen: process 1's error line, then process 0's, one newline).
  """
  sys.stderr.write(line + '\n')
  sys.stderr.flush()


class _PrefixedLines(io.TextIOBase):
  """A text stream that prefixes each line it passes on."""

  def __init__(self, stream, prefix: str):
    self.stream, self.prefix, self.at_start = stream, prefix, True

  def write(self, text: str) -> int:
    out = []
    for line in text.splitlines(keepends=True):
      if self.at_start and self.prefix not in line:  # a log line has it
        out.append(self.prefix)
      out.append(line)
      self.at_start = line.endswith('\n')
    self.stream.write(''.join(out))
    return len(text)

  def flush(self) -> None:
    self.stream.flush()

  def fileno(self) -> int:
    return self.stream.fileno()


_quieted = False  # once per process


def quiet_other_processes(index: int, count: int) -> None:
  """On process ``index`` > 0 of ``count`` > 1: warnings and errors only.

  INFO log lines and stdout (the tables) are dropped; what is left on
  stderr (log warnings, ``error:`` and ``interrupted`` lines) carries the
  prefix ``[process i]``. Process 0 and single-process runs are unchanged.
  With DINO_JAX_LOG_ALL_PROCESSES=1 nothing is dropped, only prefixed.
  Called with ``--process_id`` before JAX's distributed start (its own
  INFO lines), and with JAX's numbers after it (auto-detected runs).
  """
  global _quieted
  if count <= 1 or index == 0 or _quieted:
    return
  _quieted = True
  prefix = f'[process {index}] '
  keep_info = os.environ.get(ALL_PROCESSES_VARIABLE) == '1'
  stderr = sys.stderr
  sys.stderr = _PrefixedLines(stderr, prefix)
  if keep_info:
    sys.stdout = _PrefixedLines(sys.stdout, prefix)
  else:
    sys.stdout = open(os.devnull, 'w')  # noqa: SIM115 - for the process' life
  handlers = list(logging.getLogger().handlers)
  try:
    from absl import logging as absl_logging

    handlers.append(absl_logging.get_absl_handler())
  except ImportError:  # pragma: no cover - absl is a dependency
    pass
  quiet = _ProcessPrefix(index, keep_info)  # log lines: prefixed by it
  for handler in handlers:
    handler.addFilter(quiet)


# (usage, summary, example) of every entry point, by module.
TOOLS = {
  'dino_jax.main': (
    'python -m dino_jax.main --config=FILE[:VARIANT] --workdir=DIR '
    '[--config.a.b=c ...]',
    "Trains DINO on the config's data (CPU, GPU, TPU; one or several\n"
    'processes). Rerun the same command to resume from the newest\n'
    'checkpoint in DIR. Writes DIR/metrics.jsonl, DIR/checkpoints/ and, at\n'
    'the end, the evaluations the config asks for (DIR/eval/).',
    'python -m dino_jax.main --config=configs/fashion_mnist.py '
    '--workdir=/tmp/dino_fashion_mnist',
  ),
  'dino_jax.eval.knn': (
    'python -m dino_jax.eval.knn --workdir=DIR [--config.eval.x=y ...]',
    'Weighted k-NN accuracy of the teacher backbone of the newest\n'
    'checkpoint in DIR (or of --pretrained=*.pth with --config). Adds a\n'
    'record to DIR/eval/records/ and updates DIR/eval/knn.json.',
    'python -m dino_jax.eval.knn --workdir=/tmp/dino_fashion_mnist '
    "--config.eval.ks='(20,)'",
  ),
  'dino_jax.eval.linear': (
    'python -m dino_jax.eval.linear --workdir=DIR [--config.linear.x=y ...]',
    'Linear probe on the frozen teacher backbone (lr swept; '
    'linear.sweep=False:\nthe official single lr). Adds a record to '
    'DIR/eval/records/, writes\nDIR/eval/linear.json and the head.',
    'python -m dino_jax.eval.linear --workdir=/tmp/dino_fashion_mnist '
    '--config.linear.augment=False',
  ),
  'dino_jax.eval.attention': (
    'python -m dino_jax.eval.attention --workdir=DIR --image=FILE '
    '[--image_size=N]',
    "The teacher's last-layer CLS attention per head on one image, and\n"
    'the masks keeping --threshold of the mass, as PNGs (default\n'
    'DIR/eval/attention/). --image_size: 0 (the default) takes\n'
    "eval.attention_size, else the config's k-NN crop size.",
    'python -m dino_jax.eval.attention --workdir=/tmp/dino_fashion_mnist '
    '--image=cat.jpg --image_size=224',
  ),
  'dino_jax.eval.retrieval': (
    'python -m dino_jax.eval.retrieval --workdir=DIR --data_root=ROOT '
    '--dataset=roxford5k|rparis6k',
    'Image retrieval on revisited Oxford / Paris (mAP Medium / Hard).',
    'python -m dino_jax.eval.retrieval --workdir=DIR --data_root=/data '
    '--dataset=roxford5k',
  ),
  'dino_jax.eval.copy_detection': (
    'python -m dino_jax.eval.copy_detection --workdir=DIR --data_root=COPYDAYS',
    'Copy detection on Copydays (CLS + GeM, PCA whitening, mAP per block).',
    'python -m dino_jax.eval.copy_detection --workdir=DIR '
    '--data_root=/data/copydays',
  ),
  'dino_jax.eval.video': (
    'python -m dino_jax.eval.video --workdir=DIR --davis_root=DAVIS',
    'Video object segmentation on DAVIS 2017 by label propagation (J, F).',
    'python -m dino_jax.eval.video --workdir=DIR --davis_root=/data/davis',
  ),
  'dino_jax.interop': (
    'python -m dino_jax.interop import IN.pth OUT_WORKDIR --config=FILE | '
    'export WORKDIR OUT.pth [--what=full]',
    'Converts between official DINO .pth files and dino_jax workdirs.\n'
    '--what=full exports student, teacher, center and the step.',
    'python -m dino_jax.interop export /tmp/dino_fashion_mnist out.pth '
    '--what=full',
  ),
  'dino_jax.plot': (
    'python -m dino_jax.plot --workdir=DIR [--out=PNG] [--k=20]',
    'The learning curve of a run (loss, k-NN) as a PNG (default\n'
    "DIR/curve.png); needs pip install -e '.[plot]'.",
    'python -m dino_jax.plot --workdir=/tmp/dino_fashion_mnist',
  ),
  'dino_jax.aot': (
    'python -m dino_jax.aot --config=FILE --topology=TARGET [--max_batch]',
    'Compiles the train step for a TPU topology or a GPU node on this\n'
    "machine's CPU: memory per device, FLOPs, whether it fits.",
    'python -m dino_jax.aot --config=configs/vit_s16.py --topology=v4:2x2x4',
  ),
}


def program(main_module: str) -> str:
  """The entry point's module name (``__main__`` under ``python -m``)."""
  if main_module != '__main__':
    return main_module
  spec = getattr(sys.modules['__main__'], '__spec__', None)
  return spec.name if spec is not None else main_module


def own_flags(values: flags.FlagValues) -> list[str]:
  """The flags dino_jax defined (absl's, orbax's, grain's left out)."""
  names = []
  for module, defined in values.flags_by_module_dict().items():
    # absl names a flag of the ``python -m`` module by its file's path.
    ours = module.startswith(('dino_jax', '__main__')) or os.sep in module
    if not ours:
      continue
    names += [f.name for f in defined if '.' not in f.name]
  return sorted(set(names))


def tool_help(name: str, values: flags.FlagValues) -> str:
  """``help_text`` of the entry point ``name`` (a key of TOOLS)."""
  fallback = (f'python -m {name} [flags]', '', f'python -m {name} --help')
  usage, summary, example = TOOLS.get(name, fallback)
  common = NO_CONFIG_HELP if name in NO_CONFIG_TOOLS else COMMON_HELP
  return help_text(usage, summary, values, own_flags(values), example, common)
