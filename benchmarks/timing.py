"""Timing helpers shared by the benchmark scripts.

Every side is timed in turns (one call of each, then again), so drift and
other tenants of a shared machine hit all sides alike. Both the median and
the minimum are reported: on a noisy machine the minimum is the steadier
estimate of what the code itself costs, the median of what a run sees.
"""

import json
import statistics
import time
from collections.abc import Callable


def interleaved(
  runs: dict[str, Callable[[], object]], steps: int, warmup: int = 2
) -> dict[str, list[float]]:
  """Seconds per call of each side, ``steps`` rounds after ``warmup``."""
  if steps < 1:
    raise ValueError(f'steps must be >= 1; got {steps}')
  for fn in runs.values():
    for _ in range(warmup):  # compile, allocate, fill caches
      fn()
  times = {side: [] for side in runs}
  for _ in range(steps):
    for side, fn in runs.items():
      start = time.perf_counter()
      fn()
      times[side].append(time.perf_counter() - start)
  return times


def summarize(
  times: dict[str, list[float]],
  reference: str = 'torch',
  suffix: str = '',
  ratio_suffix: str = '',
) -> dict[str, float]:
  """Median / min seconds per side and the reference's time over each side's.

  A ratio above 1 means the side is faster than the reference. Keys:
  ``{side}{suffix}_sec`` (median), ``{side}{suffix}_sec_min``, and, when the
  reference was timed, ``ratio_{side}{ratio_suffix}_over_{reference}``
  (medians) and the same key + ``_min`` (minima).
  """
  out = {}
  for side, ts in times.items():
    if not ts:
      raise ValueError(f'side {side!r} has no timings')
    out[f'{side}{suffix}_sec'] = round(statistics.median(ts), 4)
    out[f'{side}{suffix}_sec_min'] = round(min(ts), 4)
  ref = times.get(reference)
  if ref:
    for side, ts in times.items():
      if side == reference:
        continue
      key = f'ratio_{side}{ratio_suffix}_over_{reference}'
      out[key] = round(statistics.median(ref) / statistics.median(ts), 3)
      out[key + '_min'] = round(min(ref) / min(ts), 3)
  return out


def emit(rows: list[dict], out: str | None) -> None:
  """Prints each row as a JSON line; appends them to ``out`` when given."""
  for row in rows:
    print(json.dumps(row), flush=True)
  if out:
    with open(out, 'a') as f:
      for row in rows:
        f.write(json.dumps(row) + '\n')
