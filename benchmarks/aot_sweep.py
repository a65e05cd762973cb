"""The ahead-of-time table (docs/aot.md): configs x targets, one compile each.

  python benchmarks/aot_sweep.py --out /tmp/aot.jsonl             # every row
  python benchmarks/aot_sweep.py --out /tmp/aot.jsonl --rows vit_s16
  python benchmarks/aot_sweep.py --out /tmp/aot.jsonl --rows "vit_s16 v5e-16" \
      --max_batch --max_batch_step=128   # a search: each probe a compile
  python benchmarks/aot_sweep.py --summarize /tmp/aot.jsonl

Each row runs ``python -m dino_jax.aot`` in its own process (one at a time:
a ViT-S/16 compile holds one core for minutes) and appends its JSON report,
with the wall time of the whole process, to ``--out``; rows already there
are skipped, so an interrupted sweep resumes. ``--summarize`` prints the
markdown table. Needs libtpu (``pip install -e '.[tpu]'``) for the TPU rows
and the CUDA plugin (``'.[aot-gpu]'``) for the GPU ones.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Cloud TPU names (v4 and v5p count TensorCores, two per chip; v5e and v6e
# count chips) and the topologies they are.
TARGETS = {
  'v4-8': 'v4:2x2x1',
  'v4-32': 'v4:2x2x4',
  'v5e-16': 'v5e:4x4',
  'v5e-256': 'v5e:16x16',
  'v5p-8': 'v5p:2x2x1',
  'v6e-8': 'v6e:2x4',
  '8 x H100': 'h100:8',
}
CONFIGS = {
  'vit_s16': 'configs/vit_s16.py',
  'vit_b16': 'configs/vit_b16.py',
  'vit_s8': 'configs/vit_s8.py',
}


def row_key(
  config: str, target: str, max_batch: bool = False, extra: list[str] = ()
) -> str:
  """A row's name in the JSONL: config, target and any ``--config.x=y``
  overrides; a ``--max_batch`` row is a row of its own (it replaces the
  plain one in the table)."""
  key = ' '.join([config, target, *extra])
  return key + (' max_batch' if max_batch else '')


def run_row(
  config: str,
  target: str,
  max_batch: bool,
  extra: list[str],
  max_batch_step: int = 0,
) -> dict:
  """One ``python -m dino_jax.aot`` process; its report plus wall time."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'report.json')
    command = [
      sys.executable,
      '-m',
      'dino_jax.aot',
      f'--config={CONFIGS[config]}',
      f'--topology={TARGETS[target]}',
      f'--out={out}',
      *(['--max_batch'] if max_batch else []),
      *([f'--max_batch_step={max_batch_step}'] if max_batch_step else []),
      *extra,
    ]
    start = time.perf_counter()
    stdout = []
    # Its output is passed on as it comes (a --max_batch search's probes
    # take minutes each); stderr goes to a file, read at the end.
    with open(os.path.join(tmp, 'stderr'), 'w+') as stderr:
      process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True
      )
      for line in process.stdout:
        print(f'  {line}', end='', flush=True)
        stdout.append(line)
      process.wait()
      stderr.seek(0)
      errors = stderr.read()
    wall = time.perf_counter() - start
    if not os.path.exists(out):
      lines = errors.strip().splitlines()
      return {
        'key': row_key(config, target, max_batch, extra),
        'error': lines[-1] if lines else f'exit {process.returncode}',
        'wall_seconds': round(wall, 1),
      }
    with open(out) as f:
      report = json.load(f)
  report['key'] = row_key(config, target, max_batch, extra)
  report['overrides'] = list(extra)
  report['target'] = target
  report['config'] = config
  report['wall_seconds'] = round(wall, 1)
  report['verdict'] = ''.join(stdout).strip().splitlines()[-1]
  report['date'] = time.strftime('%Y-%m-%d')
  return report


def _step_peak(report: dict) -> float | None:
  """The train step's peak per device, or what the compiler said it needs."""
  if 'memory' in report:
    return report['memory']['peak']
  return report.get('needed_bytes')


def _same_program(report: dict, rows: list[dict]) -> list[dict]:
  """The other rows whose devices run ``report``'s program on their share
  of the batch: same config, chip and remat, ``mesh.fsdp`` = 1."""
  if report['mesh'].get('fsdp', 1) != 1:
    return []
  return [
    r
    for r in rows
    if r is not report
    and 'fits' in r
    and r['config'] == report['config']
    and r['chip'] == report['chip']
    and r['mesh'].get('fsdp', 1) == 1
    and r['remat'] == report['remat']
  ]


def searched_max_batch(
  report: dict, rows: list[dict] = ()
) -> tuple[int, str] | None:
  """(global batch, target searched): a ``--max_batch`` search of this
  program on another topology of the chip, in batch per device (it holds
  for every device count); None without one."""
  searched = [r for r in _same_program(report, rows) if 'max_batch' in r]
  if not searched:
    return None
  best = max(searched, key=lambda r: r['max_batch'] / r['devices'])
  per_device = best['max_batch'] // best['devices']
  return per_device * report['devices'], best['target']


def estimated_max_batch(report: dict, rows: list[dict] = ()) -> int | None:
  """Where a line through the step's peaks meets the limit; a global batch.

  With ``mesh.fsdp`` = 1 every device runs the same program on its share
  of the batch, whatever the device count (ViT-S/16: v5e:2x2 at batch 256
  and v5e-16 at 1024 both peak at 11.14 GiB), so the peaks of every row of
  ``rows`` for this config and chip count (and a ``--max_batch`` row's
  probes), in images per device: the line
  goes through the largest that fitted and the smallest that did not, else
  the two largest that fitted, else the state's bytes (batch 0) and this
  row's peak. An estimate only (``--max_batch`` compiles to find it): the
  compiler's choices change with size (``searched_max_batch`` first).
  """
  limit = report['memory_limit_bytes']
  devices = report['devices']
  pool = [report, *_same_program(report, rows)]
  points = {(r['batch_size'] / r['devices'], _step_peak(r)) for r in pool}
  for r in pool:  # a --max_batch row's probes
    for batch, p in r.get('max_batch_probes', {}).items():
      points.add((int(batch) / r['devices'], p['peak_bytes']))
  points = sorted(p for p in points if p[1])
  fitted = [p for p in points if p[1] <= limit]
  failed = [p for p in points if p[1] > limit]
  m = report.get('memory')
  if fitted and failed:
    (b0, m0), (b1, m1) = fitted[-1], failed[0]
  elif len(fitted) >= 2:
    (b0, m0), (b1, m1) = fitted[-2:]
  elif m and m['peak']:
    fixed = m['arguments'] + m['outputs'] - m['aliased']
    (b0, m0), (b1, m1) = (0, fixed), (report['batch_size'] / devices, m['peak'])
  else:
    return None
  if m1 <= m0 or b1 <= b0:
    return None
  per_device = b0 + (limit - m0) * (b1 - b0) / (m1 - m0)
  return int(per_device) * devices if per_device >= 1 else None


def table(rows: list[dict]) -> str:
  """The markdown table of the docs: one line per config and target (in
  ``CONFIGS`` and ``TARGETS`` order), a ``--max_batch`` row replacing a
  plain one."""
  chosen = {}
  for r in rows:
    name = r['key'].removesuffix(' max_batch')
    if name not in chosen or 'max_batch' in r or 'fits' not in chosen[name]:
      chosen[name] = r
  configs, targets = list(CONFIGS), list(TARGETS)
  rows = sorted(
    chosen.values(),
    key=lambda r: (
      configs.index(r['config']) if r.get('config') in configs else 99,
      targets.index(r['target']) if r.get('target') in targets else 99,
      r['key'],
    ),
  )
  lines = [
    '| config | target | mesh | fits | peak GiB / device (of) | largest '
    'batch | img/s / device at 35 % MFU; roofline | compile s, host GiB |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    if 'fits' not in r:  # the tool stopped with an error line
      error = f'error: {r["error"]}'
      lines.append(
        f'| {r["key"]} | | | {error} | | | | {r["wall_seconds"]:.0f} |'
      )
      continue
    mesh = ' x '.join(f'{k} {v}' for k, v in r['mesh'].items())
    limit = r['memory_limit_bytes'] / 2**30
    if 'memory' in r:
      peak = f'{r["memory"]["peak"] / 2**30:.2f} ({limit:.2f})'
    elif r.get('needed_bytes'):
      peak = f'> {r["needed_bytes"] / 2**30:.1f} ({limit:.2f})'
    else:
      peak = f'? ({limit:.2f})'
    if 'max_batch' in r:
      largest = f'{r["max_batch"]} ({len(r["max_batch_probes"])} compiles)'
    elif found := searched_max_batch(r, rows):
      largest = f'{found[0]} ({found[1]} search, per device)'
    else:
      estimate = estimated_max_batch(r, rows)
      largest = f'~{estimate} (est.)' if estimate else ''
    config = ' '.join(
      [
        r['config'],
        *(o.removeprefix('--config.') for o in r.get('overrides', [])),
      ]
    )
    lines.append(
      f'| {config} | {r["target"]} | {mesh} | '
      f'{"yes" if r["fits"] else "no"} | {peak} | {largest} | '
      f'{r["images_per_second_per_device"]:.0f}{_roofline(r)} | '
      f'{r["wall_seconds"]:.0f}, {r["host_peak_bytes"] / 2**30:.1f} |'
    )
  return '\n'.join(lines)


def _roofline(r: dict) -> str:
  """'; N memory-bound (X GB / image)' where the row counted its bytes."""
  roof = r.get('roofline') or {}
  if not roof.get('memory'):
    return ''
  return (
    f'; {roof["images_per_second"]:.0f} {roof["bound"]}-bound '
    f'({r["xla_bytes_per_image"] / 1e9:.2f} GB / image)'
  )


def read(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', help='JSON Lines file the rows are added to.')
  parser.add_argument(
    '--rows',
    default='',
    help='Comma-separated filters: a row runs if its "config target" '
    'contains one (e.g. vit_s16,v5e-16); default all.',
  )
  parser.add_argument(
    '--max_batch', action='store_true', help='Bisect the largest batch too.'
  )
  parser.add_argument(
    '--max_batch_step',
    type=int,
    default=0,
    help="--max_batch's resolution in images (default: the device count); "
    'a coarser one saves probes, each a compile of minutes on a TPU.',
  )
  parser.add_argument(
    '--summarize', nargs='*', help='Print the table of these JSONL files.'
  )
  args, extra = parser.parse_known_args()
  if args.summarize:
    rows = [r for path in args.summarize for r in read(path)]
    print(table(rows))
    return
  if not args.out:
    parser.error('--out is needed to run rows')
  done = {r['key'] for r in read(args.out)}
  filters = [f for f in args.rows.split(',') if f]
  start = time.perf_counter()
  for config in CONFIGS:
    for target in TARGETS:
      key = row_key(config, target, args.max_batch, extra)
      if key in done or (filters and not any(f in key for f in filters)):
        continue
      print(f'{key}: compiling', flush=True)
      report = run_row(
        config, target, args.max_batch, extra, args.max_batch_step
      )
      with open(args.out, 'a') as f:
        f.write(json.dumps(report) + '\n')
      print(
        f'{key}: {report.get("verdict", report.get("error"))} '
        f'({report["wall_seconds"]:.0f} s)',
        flush=True,
      )
  print(f'sweep: {time.perf_counter() - start:.0f} s', flush=True)
  print(table(read(args.out)))


if __name__ == '__main__':
  main()
