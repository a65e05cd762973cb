"""The largest global batch whose train step fits a target's memory.

``find_max_batch`` probes batches with one compile each (``compile_step``),
bracketing the limit by the line through the peaks seen so far, then by
halving.
"""

import ml_collections

from dino_jax.aot.compile import compile_step, fits, memory
from dino_jax.aot.hlo import xla_flops
from dino_jax.aot.targets import GiB


def _with_batch(config, batch: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.batch_size = batch
  return config


def find_max_batch(
  config,
  mesh,
  platform: str,
  limit: float,
  step: int,
  known: dict,
  fixed: float | None = None,
) -> tuple[int, dict]:
  """The largest global batch, a multiple of ``step``, whose step fits.

  Bisection, each probe one compile; ``known`` ({batch: (fits, peak bytes or
  None, compile seconds, XLA's FLOPs per device or None)}) seeds it. The
  probes follow the line through the peaks seen so far (memory grows
  about linearly with the batch) while it at least halves the bracket,
  then halve it. With one peak known, ``fixed`` (the bytes that do not grow
  with the batch: the state) is the line's other point, at batch 0;
  without it the search doubles the batch first.

  Returns:
    (largest fitting batch, 0 if none; every probe as in ``known``: near
    the limit the compiler rematerializes, so the FLOPs per image grow).
  """
  probes = dict(known)

  def probe(batch):
    result = compile_step(_with_batch(config, batch), mesh, platform)
    peak = (
      result.needed if result.exhausted else memory(result.compiled)['peak']
    )
    xla = None if result.exhausted else xla_flops(result.compiled)
    probes[batch] = (fits(result, limit), peak, result.seconds, xla)
    print(
      f'  batch {batch}: {"fits" if probes[batch][0] else "does not fit"}'
      + (f' ({peak / GiB:.2f} GiB)' if peak else '')
      + (f', XLA {xla / 1e12:.4g} TFLOPs per device' if xla else '')
      + f', compiled in {result.seconds:.0f} s',
      flush=True,
    )
    return probes[batch][0]

  def bounds():
    lo = max([b for b, p in probes.items() if p[0]], default=0)
    hi = min([b for b, p in probes.items() if not p[0]], default=None)
    return lo, hi

  width, slow = None, False  # the bracket's before the last probe
  for _ in range(24):
    lo, hi = bounds()
    if hi is not None and hi - lo <= step:
      return lo, probes
    # Once a line's probe did not halve the bracket, halve it from then on:
    # a refused peak far over the limit (and flat peaks below it) made the
    # line creep in steps (ViT-S/16 on 8 x H100: 2992, 2952, 2912, ...).
    slow = slow or (
      width is not None and hi is not None and hi - lo > width / 2
    )
    width = hi - lo if hi is not None else None
    guess = None if slow else _linear_guess(probes, limit, step, fixed)
    if guess is None:  # double up to a failure, then halve
      nxt = 2 * max(lo, step) if hi is None else (lo + hi) // 2
    else:  # the line's batch, strictly inside the bracket
      nxt = max(guess, lo + step)
      if hi is not None:
        nxt = min(nxt, hi - step)
      elif sum(p[0] for p in probes.values()) >= 2:
        # Up from two fitted peaks, at most 4x: near the limit the peak
        # stops growing (the compiler rematerializes), and a flat line's
        # batch is absurd (ViT-S/16 on v5p-8: 90.05 and 90.06 GiB at 2176
        # and 3264 put it at 4993280; XLA:GPU would compile that).
        nxt = min(nxt, 4 * lo)
    nxt = max(step, nxt // step * step)
    if nxt in probes:  # a batch seen before: halve the bracket instead
      nxt = max(step, (lo + (hi or 2 * lo)) // 2 // step * step)
      if nxt in probes:
        return lo, probes
    probe(nxt)
  return bounds()[0], probes


def _linear_guess(
  probes: dict, limit: float, step: int, fixed: float | None = None
) -> int | None:
  """Where the line through two measured peaks meets ``limit``.

  The two are those around the limit (the largest batch that fitted and
  the smallest that did not) where both were measured, else the two
  nearest to it on the measured side; with one peak, that one and
  ``fixed`` at batch 0. None with fewer than two points.
  """
  fitted = sorted((b, p[1]) for b, p in probes.items() if p[0] and p[1])
  failed = sorted((b, p[1]) for b, p in probes.items() if not p[0] and p[1])
  if fixed and len(fitted) + len(failed) == 1:
    (b0, m0), (b1, m1) = (0, fixed), (fitted + failed)[0]
  elif fitted and failed:
    (b0, m0), (b1, m1) = fitted[-1], failed[0]
  elif len(fitted) >= 2:
    (b0, m0), (b1, m1) = fitted[-2:]
  elif len(failed) >= 2:
    (b0, m0), (b1, m1) = failed[:2]
  else:
    return None
  if m1 <= m0 or b1 <= b0:
    return None
  guess = b0 + (limit - m0) * (b1 - b0) / (m1 - m0)
  return int(guess // step * step) if guess > 0 else None
