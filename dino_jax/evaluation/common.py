"""What every evaluation shares: the backbone check, its records.

An evaluation is a function ``(config, mesh, backbone, params, ...) ->
dict``; its CLI (``python -m dino_jax.eval.<name>``) is in the shell
(``dino_jax/cli/evals.py``: --workdir or --pretrained with --config, the
teacher backbone of the newest intact checkpoint). Here:

  ``write_record(workdir, name, payload)``: WORKDIR/eval/<name>.json and a
    record of the run in WORKDIR/eval/records/ (never replaced) through
    ``storage`` (local or gs://), written by process 0, atomically;
  ``require_vit(config, protocol)``: the protocols that need patch tokens.

Long work calls ``interrupt.check()`` between batches, so SIGTERM / Ctrl-C
stop it cleanly with nothing partial written.
"""

import datetime
import json
import sys

import jax

from dino_jax import storage
from dino_jax import workdir as workdir_lib


def require_vit(config, protocol: str) -> None:
  """Raises WorkdirError unless the backbone is a ViT (patch tokens)."""
  from dino_jax.config import ARCHS  # no cycle: config is a leaf

  if config.model.arch not in ARCHS:
    raise workdir_lib.WorkdirError(
      f'{protocol} needs a ViT backbone (its CLS and patch tokens); '
      f'model.arch={config.model.arch} is not one of {", ".join(ARCHS)}'
    )


def write_record(
  workdir: str,
  name: str,
  payload: dict,
  *,
  settings: dict | None = None,
  keep: tuple[str, ...] = (),
) -> str:
  """Writes WORKDIR/eval/<name>.json and a record of this run; the path.

  Every call adds ``WORKDIR/eval/records/<name>-step<S>-<UTC time>.json``
  (what, step, settings, time, command line, the payload), which no later
  run replaces. ``<name>.json`` holds the newest results; its entries named
  in ``keep`` that ``payload`` lacks stay (the baselines of a k-NN table
  when only the trained features were scored again). Process 0 only;
  atomic (``storage.write_text``): a run stopped meanwhile leaves the
  previous files whole. Local paths and gs:// alike.
  """
  path = storage.join(workdir, 'eval', f'{name}.json')
  if jax.process_index() != 0:
    return path
  storage.makedirs(storage.join(workdir, 'eval', 'records'))
  now = datetime.datetime.now(datetime.UTC)
  record = {
    'what': name,
    'step': payload.get('step'),
    'time': now.isoformat(timespec='seconds'),
    'command': list(sys.argv),
    'settings': settings or {},
    'results': payload,
  }
  stamp = now.strftime('%Y%m%dT%H%M%S%fZ')
  storage.write_text(
    storage.join(
      workdir, 'eval', 'records', f'{name}-step{record["step"]}-{stamp}.json'
    ),
    json.dumps(record, indent=2),
  )
  kept = {}
  if keep and storage.as_path(path).exists():
    try:
      previous = json.loads(storage.read_text(path))
    except ValueError:  # a file written by hand, or older: replaced
      previous = {}
    kept = {k: previous[k] for k in keep if k in previous and k not in payload}
  storage.write_text(path, json.dumps({**payload, **kept}, indent=2))
  return path


def read_records(workdir: str, name: str | None = None) -> list[dict]:
  """The records of WORKDIR/eval/records/ (of evaluation ``name``), oldest
  first."""
  directory = storage.as_path(storage.join(workdir, 'eval', 'records'))
  if not directory.exists():
    return []
  # Oldest first by the name's stamp (microseconds): the records' 'time'
  # is in seconds, and two evaluations can end within one.
  paths = sorted(
    directory.glob('*.json'), key=lambda p: p.stem.rsplit('-', 1)[-1]
  )
  records = [json.loads(p.read_text()) for p in paths]
  return [r for r in records if name is None or r['what'] == name]


def write_bytes(workdir: str, relative: str, data: bytes) -> str:
  """Writes WORKDIR/eval/<relative> (process 0 only), atomically."""
  path = storage.join(workdir, 'eval', relative)
  if jax.process_index() == 0:
    storage.makedirs(str(storage.as_path(path).parent))
    storage.write_bytes(path, data)
  return path
