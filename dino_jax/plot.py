"""Draws a run's learning curve: k-NN top-1 against steps, loss and entropy.

CLI: ``python -m dino_jax.plot --workdir=DIR [--out=PNG] [--k=20]``; DIR
and PNG may be URLs (``gs://bucket/run``).

Reads ``DIR/metrics.jsonl``: the ``knn_<features>_k<k>`` columns written by
every evaluation (``eval_every_steps`` and the one at the end), and the
logged loss and teacher entropy. Feature sets scored only once (random init
and raw pixels, with ``eval.baselines``) are drawn as horizontal lines.
Needs matplotlib (``pip install -e '.[plot]'``).
"""

import io
import os
import sys

from absl import app, flags

from dino_jax import metrics as metrics_lib
from dino_jax import storage
from dino_jax.cli import console

_LABELS = {
  'trained': 'trained (teacher)',
  'random_init': 'random init',
  'raw_pixels': 'raw pixels',
}
_COLORS = {'trained': 'C0', 'random_init': 'C7', 'raw_pixels': 'C2'}


class PlotError(ValueError):
  """The workdir holds nothing to draw."""


def read_curves(workdir: str, k: int) -> dict:
  """Returns {'knn': {features: [(step, top1)]}, 'loss': [...], 'H_t': ...}.

  A step logged twice (a resumed run) keeps its last value.
  """
  path = storage.join(workdir, 'metrics.jsonl')
  try:
    found = metrics_lib.exists(path, '--workdir')  # remote: its parts
  except storage.StorageError as error:
    raise PlotError(str(error)) from error
  if not found:
    raise PlotError(f'{path} does not exist; pass --workdir of a training run')
  knn, loss, entropy = {}, {}, {}
  suffix = f'_k{k}'
  rows, _ = metrics_lib.read_rows(path)  # a broken line is skipped
  for row in rows:
    step = row['step']
    for name, value in row.items():
      if name.startswith('knn_') and name.endswith(suffix):
        knn.setdefault(name[4 : -len(suffix)], {})[step] = value
    if 'loss' in row:
      loss[step] = row['loss']
    if 'teacher_entropy' in row:
      entropy[step] = row['teacher_entropy']
  if not knn:
    raise PlotError(
      f'{path} has no k-NN top-1 at k={k}; train with '
      '--config.eval_every_steps=N (and eval.knn) or pick a k of eval.ks'
    )
  return {
    'knn': {name: sorted(points.items()) for name, points in knn.items()},
    'loss': sorted(loss.items()),
    'H_t': sorted(entropy.items()),
  }


def draw(curves: dict, out: str, k: int, title: str) -> None:
  import matplotlib  # only this command needs it

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  fig, (top, bottom) = plt.subplots(
    2, 1, figsize=(6.4, 5.6), sharex=True, height_ratios=(3, 2)
  )
  for name, points in sorted(curves['knn'].items()):
    steps, values = zip(*points, strict=True)
    style = {'label': _LABELS.get(name, name), 'color': _COLORS.get(name)}
    if len(points) == 1 and name != 'trained':
      top.axhline(values[0], linestyle='--', linewidth=1, **style)
    else:
      top.plot(steps, values, marker='o', **style)
  top.set_ylabel(f'k-NN top-1 (%), k = {k}')
  top.grid(alpha=0.3)
  top.legend(loc='best')  # the fewest points covered
  top.set_title(title)
  if curves['loss']:
    bottom.plot(*zip(*curves['loss'], strict=True), label='loss')
  if curves['H_t']:
    bottom.plot(*zip(*curves['H_t'], strict=True), label='teacher entropy')
  bottom.set_xlabel('step')
  bottom.grid(alpha=0.3)
  bottom.legend(loc='upper right')
  fig.tight_layout()
  if not storage.is_remote(out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  image = io.BytesIO()
  fig.savefig(image, format='png', dpi=100)
  plt.close(fig)
  storage.write_bytes(out, image.getvalue())


def _define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'Workdir of a training run.')
  flags.DEFINE_string('out', None, 'PNG path (default WORKDIR/curve.png).')
  flags.DEFINE_integer('k', 20, 'Which k of eval.ks to draw.')
  flags.DEFINE_string('title', '', 'Title above the curves.')


def main(argv) -> None:
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  if not f.workdir:
    sys.exit('error: --workdir is required (the workdir of a training run)')
  out = f.out or storage.join(f.workdir, 'curve.png')
  try:
    curves = read_curves(f.workdir, f.k)
  except PlotError as error:
    sys.exit(f'error: {error}')
  try:
    draw(curves, out, f.k, f.title)
  except ImportError:
    sys.exit("error: drawing needs matplotlib: pip install -e '.[plot]'")
  print(f'wrote {out}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing; ``-h`` / ``--help`` print the help and exit 0."""
  if console.wants_help(argv):
    console.print_help(console.tool_help('dino_jax.plot', flags.FLAGS))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}; pass --help for the flags')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=parse_flags)
