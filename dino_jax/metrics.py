"""Metrics: JSON lines, TensorBoard, progress lines with ETA, health checks.

Only process 0 writes files. ``check_health`` turns SPEC §1's collapse
signatures into warnings and a non-finite loss into an error.
"""

import json
import logging
import math
import os
import sys
import time

import jax
import numpy as np

from dino_jax import storage

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or inf; the state is not saved."""


# On object storage (no append) the rows are kept in parts of PART_ROWS
# rows, ``metrics.jsonl.d/<index of the part's first row>.jsonl``: a write
# uploads only the last part, so a run uploads O(rows) bytes, not O(rows²).
PART_ROWS = 100


def parts_folder(path: str) -> str:
  """Where the parts of a remote ``metrics.jsonl`` are."""
  return f'{path}.d'


def _part_name(index: int) -> str:
  return f'{index * PART_ROWS:09d}.jsonl'


def _unlink(path: str) -> None:
  try:
    storage.as_path(path).unlink()
  except FileNotFoundError:
    pass


def _lines(rows: list[dict]) -> str:
  return ''.join(json.dumps(r) + '\n' for r in rows)


class MetricWriter:
  """Writes ``metrics.jsonl`` and TensorBoard events under ``workdir``.

  The rows live in memory too. Local: each row is appended to the file (a
  line cut by a kill is dropped at the next start). On object storage,
  which has no append, the rows are parts of ``PART_ROWS`` rows
  (``parts_folder``), each replaced whole (one upload) while it fills:
  a run killed at any moment leaves the previous parts intact, and a log
  step uploads one part, not all the rows. ``read_rows`` reads either
  layout back as one file. A resume rewrites what changes: rows past the
  restored step, lines that do not parse.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self.path = storage.join(workdir, 'metrics.jsonl')
    self.remote = storage.is_remote(self.path)
    self._tb = None
    self._rows: list[dict] = []
    self._parts = 0  # parts in the bucket (remote)
    if not self.active:
      return
    storage.makedirs(workdir)
    if exists(self.path, 'metrics'):
      # Rows past the restored step came from a run that died before its
      # next checkpoint; they are recomputed, so drop them. So are lines
      # that do not parse (a file written by hand, or cut by a kill).
      rows, bad = read_rows(self.path)
      if bad:
        logger.warning(
          'dropped %d unreadable line(s) of %s (line %s)',
          len(bad),
          self.path,
          ', '.join(map(str, bad[:5])) + (', ...' if len(bad) > 5 else ''),
        )
      self._rows = [r for r in rows if r['step'] <= resume_step]
      if self.remote:
        self._adopt_parts(bad or len(self._rows) < len(rows))
      elif bad or len(self._rows) < len(rows):
        self._rewrite()
    self._tb = _summary_writer()(storage.join(workdir, 'tensorboard'))

  def has_evaluation(self, step: int) -> bool:
    """Whether ``metrics.jsonl`` holds k-NN columns for ``step``."""
    return any(r['step'] == step and _is_evaluation(r) for r in self._rows)

  def _rewrite(self) -> None:
    """Replaces the local file with the rows; whole or not at all."""
    storage.write_text(self.path, _lines(self._rows))

  def _adopt_parts(self, changed: bool) -> None:
    """Takes over the parts in the bucket: the rows kept, in parts whole.

    A single ``metrics.jsonl`` object (written before the parts) becomes
    parts, then is deleted.
    """
    folder = storage.as_path(parts_folder(self.path))
    names = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    legacy = storage.as_path(self.path).exists()
    expected = [_part_name(i) for i in range(len(names))]
    self._parts = len(names)
    if changed or legacy or names != expected:
      for name in names:  # rewritten from the first
        if name not in expected:
          _unlink(os.fspath(folder / name))
      self._parts = min(self._parts, len(expected))
      self._upload(0)
    if legacy:
      _unlink(self.path)

  def _upload(self, first_row: int) -> None:
    """Uploads the parts holding rows ``first_row`` on; deletes parts past
    the last row (rows dropped)."""
    count = -(-len(self._rows) // PART_ROWS)
    folder = parts_folder(self.path)
    for i in range(first_row // PART_ROWS, count):
      rows = self._rows[i * PART_ROWS : (i + 1) * PART_ROWS]
      storage.write_text(storage.join(folder, _part_name(i)), _lines(rows))
    for i in range(count, self._parts):
      _unlink(storage.join(folder, _part_name(i)))
    self._parts = count

  def write(
    self, step: int, scalars: dict[str, float], replace: bool = False
  ) -> None:
    """Adds a row; ``replace``: k-NN rows already at ``step`` give way to
    it (a rerun of a finished run evaluates its last step again)."""
    if not self.active or not scalars:
      return
    row = {'step': int(step), **{k: _plain(v) for k, v in scalars.items()}}
    first_changed = len(self._rows)
    removed = []
    if replace:
      removed = [
        i
        for i, r in enumerate(self._rows)
        if r['step'] == step and _is_evaluation(r)
      ]
      if removed:
        first_changed = removed[0]
        self._rows = [r for i, r in enumerate(self._rows) if i not in removed]
    self._rows.append(row)
    if self.remote:
      self._upload(first_changed)
    elif removed:  # (the removed row may have been the last one)
      self._rewrite()
    else:
      with open(self.path, 'a') as f:
        f.write(json.dumps(row) + '\n')
    for name, value in row.items():
      if name != 'step' and isinstance(value, (int, float)):
        self._tb.add_scalar(f'train/{name}', value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch when it is installed (as for dino_jax's tests,
  and for many users coming from PyTorch DINO), only to accept torch
  tensors; we write floats. Importing torch cost each training process
  ~3.5 s of start-up (2-core VM): it is kept out while tensorboardX loads,
  unless already imported.
  """
  if 'tensorboardX' in sys.modules or 'torch' in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules['torch'] = None  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


def _is_evaluation(row: dict) -> bool:
  return any(k.startswith('knn_') for k in row)


def exists(path: str, what: str = 'path') -> bool:
  """Whether a ``metrics.jsonl`` exists: the file, or its parts (remote)."""
  if storage.exists(path, what):
    return True
  return storage.is_remote(path) and storage.exists(parts_folder(path), what)


def _texts(path: str):
  """The text of ``path``, then of its parts in order (remote)."""
  file = storage.as_path(path)
  if not storage.is_remote(path):
    yield file.read_text()
    return
  if file.exists():  # written before the parts
    yield file.read_text()
  folder = storage.as_path(parts_folder(path))
  if folder.exists():
    for part in sorted(folder.iterdir(), key=lambda p: p.name):
      yield part.read_text()


def read_rows(path: str) -> tuple[list[dict], list[int]]:
  """The rows of a ``metrics.jsonl`` (local, or remote in parts), and the
  numbers of lines that do not parse as a JSON object with a ``step``."""
  rows, bad = [], []
  lines = (line for text in _texts(path) for line in text.splitlines())
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      bad.append(number)
      continue
    if isinstance(row, dict) and 'step' in row:
      rows.append(row)
    else:
      bad.append(number)
  return rows, bad


def _plain(value):
  value = np.asarray(value).item() if np.ndim(value) == 0 else value
  return float(value) if isinstance(value, (float, np.floating)) else value


class Progress:
  """Images/s and ETA between log steps."""

  def __init__(self, start_step: int, total_steps: int, batch_size: int):
    self.total = total_steps
    self.batch_size = batch_size
    self.last_step, self.last_time = start_step, time.time()
    self.start_step, self.start_time = start_step, self.last_time

  def update(self, step: int) -> dict[str, float]:
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    overall = (step - self.start_step) / max(now - self.start_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(overall, 1e-9)
    return {
      'steps_per_sec': rate,
      'images_per_sec': rate * self.batch_size,
      'eta_sec': eta,
    }


def format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def progress_line(step: int, total_steps: int, s: dict[str, float]) -> str:
  """The training log's line for a logged step (its scalars ``s``)."""
  return (
    f'step {step}/{total_steps}  epoch {s["epoch"]:.2f}  loss '
    f'{s["loss"]:.4f}  H_t {s["teacher_entropy"]:.3f}  lr {s["lr"]:.3g}  '
    f'wd {s["wd"]:.3g}  m {s["momentum"]:.5f}  '
    f'{s["images_per_sec"]:.1f} img/s  ETA {format_eta(s["eta_sec"])}'
  )


def check_health(
  step: int, scalars: dict[str, float], out_dim: int, last_checkpoint
) -> list[str]:
  """Raises on a non-finite loss; returns collapse warnings (SPEC §1)."""
  loss = scalars['loss']
  state_finite = scalars.get('state_finite', 1.0) >= 1.0
  if not math.isfinite(loss) or not state_finite:
    where = (
      f'the last good checkpoint is step {last_checkpoint}'
      if last_checkpoint is not None
      else 'no checkpoint was saved yet'
    )
    what = (
      f'loss is {loss}:' if not math.isfinite(loss) else 'updated parameters'
    )
    raise NonFiniteLossError(
      f'{what} not finite at step {step}; stopping without saving ({where}). '
      'Try a lower lr, a lower teacher_temp, or model.dtype=float32.'
    )
  warnings = []
  log_k = math.log(out_dim)
  entropy = scalars.get('teacher_entropy', float('nan'))
  if abs(loss - log_k) < 1e-3:
    warnings.append(
      f'loss {loss:.4f} equals ln(K) = {log_k:.4f}: the student outputs '
      'are uniform (collapse). Lower teacher_temp or raise momentum.'
    )
  if entropy > 0.98 * log_k:
    warnings.append(
      f'teacher entropy {entropy:.3f} is near ln(K) = {log_k:.3f}: the '
      'teacher is uniform (collapse to uniform).'
    )
  if entropy < 0.05 and scalars.get('teacher_prototypes', 2) <= 1:
    warnings.append(
      f'teacher entropy {entropy:.4f} with one prototype in use: '
      'collapse to one dimension.'
    )
  return warnings


def fetch_checked(metrics, step: int, out_dim: int, last_saved) -> dict:
  """A step's metrics (on device) as floats, its collapse warnings logged;
  raises ``NonFiniteLossError`` on a bad state (``check_health``)."""
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  for warning in check_health(step, values, out_dim, last_saved):
    logger.warning('step %d: %s', step, warning)
  return values


def plan_lines(config, mesh, steps_per_epoch: int, total_steps: int):
  """The run's plan as the training log states it at the start."""
  return [
    f'mesh {dict(mesh.shape)} over {jax.device_count()} devices, '
    f'{jax.process_count()} processes',
    f'epochs {config.epochs} x {steps_per_epoch} steps/epoch = '
    f'{config.epochs * steps_per_epoch} steps; training {total_steps} '
    f'steps; global batch {config.batch_size}; peak lr '
    f'{config.optim.lr * config.batch_size / 256:.3g}',
  ]
