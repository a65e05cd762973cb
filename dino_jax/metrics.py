"""Metrics: JSON lines, TensorBoard, progress lines with ETA, health checks.

Only process 0 writes files. ``check_health`` turns SPEC §1's collapse
signatures into warnings and a non-finite loss into an error.
"""

import json
import logging
import math
import sys
import time

import jax
import numpy as np

from dino_jax import storage

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or inf; the state is not saved."""


class MetricWriter:
  """Writes ``metrics.jsonl`` and TensorBoard events under ``workdir``.

  The rows live in memory and each write replaces the file whole (one
  atomic write; an upload on object storage, which has no append): a run
  killed at any moment leaves the previous file intact, and no row is ever
  lost half-written or written twice. The cost grows with the rows: about
  0.5 MB at 1,000 rows, rewritten once per log step (docs/gcs.md).
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self.path = storage.join(workdir, 'metrics.jsonl')
    self._tb = None
    self._rows: list[dict] = []
    if not self.active:
      return
    storage.makedirs(workdir)
    if storage.exists(self.path, 'metrics'):
      # Rows past the restored step came from a run that died before its
      # next checkpoint; they are recomputed, so drop them. So are lines
      # that do not parse (a file written by hand, or by an older version
      # that appended).
      rows, bad = read_rows(self.path)
      if bad:
        logger.warning(
          'dropped %d unreadable line(s) of %s (line %s)',
          len(bad),
          self.path,
          ', '.join(map(str, bad[:5])) + (', ...' if len(bad) > 5 else ''),
        )
      self._rows = [r for r in rows if r['step'] <= resume_step]
      if bad or len(self._rows) < len(rows):
        self._rewrite()
    self._tb = _summary_writer()(storage.join(workdir, 'tensorboard'))

  def has_evaluation(self, step: int) -> bool:
    """Whether ``metrics.jsonl`` holds k-NN columns for ``step``."""
    return any(r['step'] == step and _is_evaluation(r) for r in self._rows)

  def _rewrite(self) -> None:
    """Replaces the file with the rows; whole or not at all."""
    storage.write_text(
      self.path, ''.join(json.dumps(r) + '\n' for r in self._rows)
    )

  def write(
    self, step: int, scalars: dict[str, float], replace: bool = False
  ) -> None:
    """Adds a row; ``replace``: k-NN rows already at ``step`` give way to
    it (a rerun of a finished run evaluates its last step again)."""
    if not self.active or not scalars:
      return
    row = {'step': int(step), **{k: _plain(v) for k, v in scalars.items()}}
    if replace:
      self._rows = [
        r for r in self._rows if not (r['step'] == step and _is_evaluation(r))
      ]
    self._rows.append(row)
    self._rewrite()
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


def read_rows(path: str) -> tuple[list[dict], list[int]]:
  """The rows of a ``metrics.jsonl``, and the numbers of lines that do not
  parse as a JSON object with a ``step``."""
  rows, bad = [], []
  with storage.as_path(path).open() as f:
    for number, line in enumerate(f, 1):
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
