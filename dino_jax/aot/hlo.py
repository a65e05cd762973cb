"""Reading a compiled program: its collectives, instructions and costs.

``collectives`` and ``hlo_instructions`` read the optimized HLO text
(``compiled.as_text()``, one device's program); ``xla_cost`` asks XLA's
cost analysis for the FLOPs and the bytes accessed.
"""

import math
import re

_DTYPE_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  's16': 2,
  'u16': 2,
  'f16': 2,
  'bf16': 2,
  's32': 4,
  'u32': 4,
  'f32': 4,
  's64': 8,
  'u64': 8,
  'f64': 8,
}
COLLECTIVES = (
  'all-reduce',
  'all-gather',
  'reduce-scatter',
  'all-to-all',
  'collective-permute',
)
# An instruction whose op is a collective (or its async -start half):
# "%name = SHAPE all-gather(...)"; SHAPE is one array or a tuple of them.
_COLLECTIVE_OP = re.compile(
  r'^\s*(?:ROOT\s+)?%\S+ = (\(.*?\)|\S+) '
  r'(' + '|'.join(COLLECTIVES) + r')(-start)?\(',
  re.MULTILINE,
)
_ARRAY = re.compile(r'\b([a-z]+[0-9]*)\[([0-9,]*)\]')


def _array_bytes(shape_text: str) -> list[int]:
  sizes = []
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = math.prod(int(d) for d in dims.split(',') if d)
    sizes.append(n * _DTYPE_BYTES[dtype])
  return sizes


# libtpu's reduce-scatter: a fusion (kind=kCustom) of an all-reduce and the
# dynamic-slice of each device's share, "calls=%all-reduce-scatter.N"; it
# runs as one reduce-scatter (its collective_algorithm_config, e.g.
# SingleInputAllReduceScatterFusion), so the all-reduce inside is not one.
_SCATTER_FUSION = re.compile(
  r'^\s*(?:ROOT\s+)?%\S+ = (\(.*?\)|\S+) fusion\(.*?calls=%'
  r'(all-reduce-scatter[^\s,]*)',
  re.MULTILINE,
)
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%(\S+) \(', re.MULTILINE)


def _computation_bodies(hlo_text: str) -> dict[str, str]:
  """Each computation's text, by name (``%name (...) -> ... {`` to ``}``)."""
  bodies = {}
  starts = [(m.start(), m.group(1)) for m in _COMPUTATION.finditer(hlo_text)]
  for i, (start, name) in enumerate(starts):
    end = starts[i + 1][0] if i + 1 < len(starts) else len(hlo_text)
    bodies[name] = hlo_text[start:end]
  return bodies


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Collectives of a compiled (per-device) HLO module, with their bytes.

  Bytes are each instruction's result on one device: the reduced tensor of
  an all-reduce, the gathered one of an all-gather, one device's share of a
  reduce-scatter. An async ``-start`` is counted once, by its result (the
  second half of its tuple where it also carries the operands); the matching
  ``-done`` is not counted again. libtpu's all-reduce-scatter fusions
  count as reduce-scatters, by their results (the shares), and the
  all-reduce inside them not at all. Loops are counted once per appearance
  (the step has none around collectives).

  Returns:
    ``{op: {'count': n, 'bytes': b}}`` for the ops present.
  """
  out: dict[str, dict[str, int]] = {}
  scatters = _SCATTER_FUSION.findall(hlo_text)
  if scatters:
    bodies = _computation_bodies(hlo_text)
    for _, name in scatters:  # leave out the fused computations
      hlo_text = hlo_text.replace(bodies.get(name, '\0'), '')
  for shape, _ in scatters:
    entry = out.setdefault('reduce-scatter', {'count': 0, 'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += sum(_array_bytes(shape))
  for shape, op, start in _COLLECTIVE_OP.findall(hlo_text):
    sizes = _array_bytes(shape)
    if start and op in (
      'all-gather',
      'reduce-scatter',
      'collective-permute',
      'all-to-all',
    ):
      # (operands..., results..., [u32 contexts]): keep the results.
      arrays = [s for s in sizes]
      if op == 'collective-permute' and len(arrays) >= 2:
        sizes = [arrays[1]]
      elif shape.startswith('(') and len(arrays) >= 2:
        sizes = arrays[len(arrays) // 2 :]
    entry = out.setdefault(op, {'count': 0, 'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += sum(sizes)
  return out


_INSTRUCTION = re.compile(r'^\s+(?:ROOT )?%\S+ = ', re.MULTILINE)


def hlo_instructions(hlo_text: str) -> int:
  """The instructions in an optimized HLO module's text, every computation's
  (fusion bodies, loop bodies and conditions included; a scanned layer's body
  counts once)."""
  return len(_INSTRUCTION.findall(hlo_text))


def xla_cost(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled program, per device.

  Returns:
    ``{'flops': ..., 'bytes': ...}``: XLA's FLOPs and the bytes its
    instructions read and write in device memory ('bytes accessed': each
    fusion's operands and results, so what stays inside a fusion is not
    counted), each None where XLA counts none (XLA:GPU does not count its
    cuBLAS/cuDNN calls, dino_jax/flops.py).
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    cost = None
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else {}
  cost = cost or {}
  out = {}
  for key, name in (('flops', 'flops'), ('bytes', 'bytes accessed')):
    value = cost.get(name)
    out[key] = float(value) if value and value > 0 else None
  return out


def xla_flops(compiled) -> float | None:
  """XLA's FLOPs per device, or None where it counts none (XLA:GPU's
  cuBLAS/cuDNN calls are not counted, dino_jax/flops.py)."""
  return xla_cost(compiled)['flops']
