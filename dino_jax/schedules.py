"""Per-iteration and per-epoch schedules, equal to the official arrays.

SPEC §4.2 (utils.py ``cosine_scheduler``) and §3 (teacher temperature). The
arrays are built on the host in float64, once, and indexed by the step inside
the jitted train step.
"""

import numpy as np


def cosine_schedule(
  base_value: float,
  final_value: float,
  epochs: int,
  steps_per_epoch: int,
  warmup_epochs: int = 0,
  start_warmup_value: float = 0.0,
) -> np.ndarray:
  """Linear warmup then cosine decay, one value per iteration.

  The warmup is ``linspace(start_warmup_value, base_value, W)`` with both ends
  included (W = warmup_epochs * steps_per_epoch); the cosine part divides by
  T - W, so its last value is not exactly ``final_value`` (SPEC §4.2).

  Args:
    base_value: value at the end of warmup / start of the cosine.
    final_value: asymptotic value of the cosine.
    epochs: number of epochs.
    steps_per_epoch: iterations per epoch.
    warmup_epochs: epochs of linear warmup.
    start_warmup_value: first warmup value.

  Returns:
    float64 array of length ``epochs * steps_per_epoch``.
  """
  total = int(epochs * steps_per_epoch)
  warmup_iters = int(warmup_epochs * steps_per_epoch)
  if warmup_iters > total:
    raise ValueError(
      f'warmup ({warmup_epochs} epochs = {warmup_iters} steps) is longer '
      f'than the run ({epochs} epochs = {total} steps)'
    )
  warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
  iters = np.arange(total - warmup_iters)
  cosine = (
    final_value
    + 0.5
    * (base_value - final_value)
    * (1 + np.cos(np.pi * iters / len(iters)))
    if len(iters)
    else np.zeros((0,))
  )
  schedule = np.concatenate([warmup, cosine]).astype(np.float64)
  assert len(schedule) == total
  return schedule


def teacher_temp_schedule(
  warmup_teacher_temp: float,
  teacher_temp: float,
  warmup_epochs: int,
  epochs: int,
) -> np.ndarray:
  """Teacher temperature per epoch (SPEC §3).

  ``linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)`` (both ends
  included) followed by ``teacher_temp`` for the remaining epochs.

  Returns:
    float64 array of length ``max(epochs, warmup_epochs)``.
  """
  warmup = np.linspace(warmup_teacher_temp, teacher_temp, int(warmup_epochs))
  rest = np.full(max(int(epochs) - int(warmup_epochs), 0), teacher_temp)
  return np.concatenate([warmup, rest]).astype(np.float64)
