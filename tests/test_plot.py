"""The learning-curve reader behind ``python -m dino_jax.plot``."""

import json
import os

import pytest

from dino_jax import plot


def _write(tmp_path, rows):
  with open(os.path.join(tmp_path, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)


def test_curves_from_training_and_evaluation_rows(tmp_path):
  _write(
    tmp_path,
    [
      {'step': 10, 'loss': 6.0, 'teacher_entropy': 5.0},
      {'step': 10, 'knn_trained_k20': 50.0, 'knn_trained_k10': 51.0},
      {'step': 20, 'loss': 5.0, 'teacher_entropy': 4.0},
      # A resumed run recomputed step 20: the last row counts.
      {'step': 20, 'loss': 4.5, 'teacher_entropy': 3.5},
      {'step': 20, 'knn_trained_k20': 60.0, 'knn_raw_pixels_k20': 85.0},
    ],
  )
  curves = plot.read_curves(str(tmp_path), 20)
  assert curves['knn'] == {
    'trained': [(10, 50.0), (20, 60.0)],
    'raw_pixels': [(20, 85.0)],
  }
  assert curves['loss'] == [(10, 6.0), (20, 4.5)]
  assert curves['H_t'] == [(10, 5.0), (20, 3.5)]
  assert plot.read_curves(str(tmp_path), 10)['knn'] == {'trained': [(10, 51.0)]}


def test_no_knn_rows_is_one_clear_error(tmp_path):
  _write(tmp_path, [{'step': 1, 'loss': 6.0}])
  with pytest.raises(plot.PlotError, match='eval_every_steps'):
    plot.read_curves(str(tmp_path), 20)
  with pytest.raises(plot.PlotError, match='does not exist'):
    plot.read_curves(str(tmp_path / 'missing'), 20)


def test_a_broken_line_is_skipped(tmp_path):
  _write(tmp_path, [{'step': 10, 'knn_trained_k20': 50.0}])
  with open(os.path.join(tmp_path, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 20, "knn_trai')  # a run killed mid-line
  curves = plot.read_curves(str(tmp_path), 20)
  assert curves['knn'] == {'trained': [(10, 50.0)]}
