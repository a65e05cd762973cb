"""What every evaluation tool shares: its flags, its model, its records.

An evaluation is a function ``(config, mesh, backbone, params, ...) ->
dict``; its CLI (``python -m dino_jax.eval.<name>``) is a thin shell:

  values: --workdir (a training or import workdir) or --pretrained=*.pth
    with --config (the official weights imported into --workdir first);
  ``load(values, overrides)``: (config, mesh, backbone, params, step), the
    teacher backbone of the newest intact checkpoint;
  ``write_record(workdir, name, payload)``: WORKDIR/eval/<name>.json and a
    record of the run in WORKDIR/eval/records/ (never replaced) through
    ``storage`` (local or gs://), written by process 0, atomically.

Long work calls ``interrupt.check()`` between batches, so SIGTERM / Ctrl-C
stop it cleanly with nothing partial written.
"""

import datetime
import json
import logging
import sys

import jax
from absl import flags

from dino_jax import interop, storage
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib

logger = logging.getLogger(__name__)


def define_flags(values: flags.FlagValues) -> None:
  """--workdir, --pretrained and --config, as every evaluation takes them."""
  kw = {'flag_values': values}
  flags.DEFINE_string(
    'workdir',
    None,
    'Training workdir (its newest checkpoint; results go to WORKDIR/eval/).',
    **kw,
  )
  flags.DEFINE_string(
    'pretrained',
    None,
    'An official DINO .pth (backbone-only or full checkpoint): imported '
    'into a new --workdir first (needs --config for the architecture).',
    **kw,
  )
  flags.DEFINE_string(
    'config',
    None,
    'With --pretrained: the config file (configs/<model>.py[:arg]). '
    'Overrides: --config.a.b=c (of this file, or of the workdir config).',
    **kw,
  )


def _group(override: str) -> str:
  """'--config.eval.ks=(1,)' -> 'eval'."""
  return override.split('=', 1)[0].split('.')[1]


def prepare_workdir(values: flags.FlagValues, overrides: list[str]):
  """Checks the common flags, imports --pretrained; the eval overrides.

  Returns:
    The overrides that apply to the workdir's saved config (after an
    import, those that shaped the model are dropped).
  """
  if not values.workdir:
    raise workdir_lib.WorkdirError('--workdir is required; pass a directory')
  if values.config and not values.pretrained:
    raise workdir_lib.ConfigOverrideError(
      f'--config={values.config} is only read with --pretrained; the '
      'workdir holds its own config (override fields with --config.a.b=c)'
    )
  if not values.pretrained:
    return list(overrides)
  if not values.config:
    raise workdir_lib.ConfigOverrideError(
      '--pretrained needs --config=configs/<model>.py (the architecture)'
    )
  if workdir_lib.has_checkpoint(values.workdir):
    logger.warning(
      '%s already holds a checkpoint; not importing %s again',
      values.workdir,
      values.pretrained,
    )
  else:
    config = workdir_lib.load_config_file(values.config, overrides)
    interop.import_checkpoint(values.pretrained, values.workdir, config)
  # The other overrides shaped the imported model; the rest is for the eval.
  return [o for o in overrides if _group(o) in workdir_lib.EVAL_GROUPS]


def load(values: flags.FlagValues, overrides: list[str]):
  """The teacher backbone of the tool's workdir (after any import).

  Returns:
    (config, mesh, backbone module, backbone params, step).
  """
  overrides = prepare_workdir(values, overrides)
  config, mesh, state, step = workdir_lib.load_workdir(
    values.workdir, overrides
  )
  _, teacher = step_lib.build_models(config)
  return config, mesh, teacher.backbone, step_lib.teacher_backbone(state), step


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
  records = [json.loads(p.read_text()) for p in directory.glob('*.json')]
  records = [r for r in records if name is None or r['what'] == name]
  return sorted(records, key=lambda r: r['time'])


def write_bytes(workdir: str, relative: str, data: bytes) -> str:
  """Writes WORKDIR/eval/<relative> (process 0 only), atomically."""
  path = storage.join(workdir, 'eval', relative)
  if jax.process_index() == 0:
    storage.makedirs(str(storage.as_path(path).parent))
    storage.write_bytes(path, data)
  return path
