"""Official DINO ``.pth`` checkpoints <-> dino_jax workdirs.

``import_checkpoint`` seeds a new workdir from an official file (full or
backbone only): what ``python -m dino_jax.interop import`` and the
evaluations' ``--pretrained`` do. ``export_checkpoint`` writes a workdir's
networks in the official layout. The parameter conversion itself:
``models/convert.py``.
"""

import contextlib
import io
import logging
import os
import sys

import jax.numpy as jnp
import numpy as np

from dino_jax import checkpoint as checkpoint_lib
from dino_jax import optim, storage
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib
from dino_jax.models.convert import (
  InteropError,
  from_pytorch,
  head_overrides,
  state_dict_of,
  strip_prefixes,
  to_numpy,
  to_pytorch,
  torch_load,
)
from dino_jax.models.resnet import ResNet

logger = logging.getLogger(__name__)


def import_checkpoint(path: str, workdir: str, config) -> int:
  """Seeds a new dino_jax workdir from an official .pth (full or backbone).

  Student and teacher (backbone and head) and the loss center are imported;
  a backbone-only file gives both networks that backbone and a fresh head.
  The optimizer state starts fresh (AdamW moments are not converted). The
  step is ``epoch * steps_per_epoch`` when the config fixes
  ``steps_per_epoch``, else 0. The file is read and checked against the
  config's model before anything is created; a failed save removes what it
  created.

  Returns:
    The step.

  Raises:
    InteropError: ``path`` is not an official checkpoint, or does not fit
      the config's model (the message names both).
    workdir.WorkdirError: ``workdir`` cannot be created or already holds a
      checkpoint.
  """
  if storage.is_remote(path):
    storage.check_reachable(path, 'the .pth')
  if not storage.as_path(path).is_file():
    raise InteropError(f'{path} is not a file; pass an official DINO .pth')
  workdir_lib.check_path(workdir)
  if workdir_lib.has_checkpoint(workdir):
    raise workdir_lib.WorkdirError(
      f'--workdir={workdir} already holds a checkpoint; import into a new '
      'workdir'
    )
  raw = torch_load(path)
  student_m, tx, init_fn = step_lib.state_template(config)
  full = isinstance(raw, dict) and 'teacher' in raw and 'student' in raw
  backbone_m, head_m = student_m.backbone, student_m.head

  def variables_of(state_dict):  # {'backbone', 'head'} -> variables
    state_dict = strip_prefixes(to_numpy(state_dict))
    out = {'backbone': from_pytorch(state_dict, backbone_m)}
    if any(k.startswith('head.') for k in state_dict):
      out['head'] = from_pytorch(state_dict, head_m)
    return out

  try:
    if full:
      student_vars = variables_of(raw['student'])
      teacher_vars = variables_of(raw['teacher'])
    else:
      student_vars = variables_of(state_dict_of(raw, 'teacher'))
      teacher_vars = student_vars
    student_params = {k: v['params'] for k, v in student_vars.items()}
    teacher_params = {k: v['params'] for k, v in teacher_vars.items()}
  except (InteropError, AttributeError, TypeError) as e:
    m = config.model
    if isinstance(backbone_m, ResNet):
      model = f'arch {m.arch}'
    else:
      model = f'embed_dim {m.embed_dim}, depth {m.depth}, patch {m.patch_size}'
    head = head_overrides(state_dict_of(raw, 'teacher'), config)
    todo = (
      'pass ' + ' '.join(head) + ' (the head of the file)'
      if head
      else "pass the --config of the checkpoint's architecture"
    )
    raise InteropError(
      f'{path} does not fit the model of the config ({model}): '
      f'{_reason(e)}; {todo}'
    ) from e
  state = init_fn()
  if full:
    student = {**state.student, **student_params}
    teacher = {**state.teacher, **teacher_params}
    center = to_numpy(raw.get('dino_loss', {})).get('center')
    center = (
      jnp.asarray(center, jnp.float32).reshape(1, -1)
      if center is not None
      else state.center
    )
    epoch = int(raw.get('epoch', 0))
    step = _resume_step(raw, epoch, config)
  else:
    backbone = student_params['backbone']
    student = {**state.student, 'backbone': backbone}
    teacher = {**state.teacher, 'backbone': backbone}
    center, step = state.center, 0
  if state.batch_stats is not None:  # BatchNorm running statistics
    state = state.replace(
      batch_stats={
        name: {
          **state.batch_stats[name],
          **{k: v['batch_stats'] for k, v in got.items() if 'batch_stats' in v},
        }
        for name, got in (('student', student_vars), ('teacher', teacher_vars))
      }
    )
  state = state.replace(
    step=jnp.asarray(step, jnp.int32),
    student=student,
    teacher=teacher,
    center=center,
    opt_state=optim.set_schedule_step(tx.init(student), step),
  )
  _save_new(workdir, step, state, config)
  workdir_lib.write_import_record(
    workdir, path, step, 'full' if full else 'backbone'
  )
  logger.info(
    'imported %s (%s) into %s at step %d',
    path,
    'full checkpoint' if full else 'backbone',
    workdir,
    step,
  )
  return step


# The extra key of an exported full checkpoint holding its step (the
# official loader reads the keys it names and ignores the others).
STEP_KEY = 'dino_jax_step'


def _resume_step(raw: dict, epoch: int, config) -> int:
  """The step a full checkpoint resumes at: its ``dino_jax_step`` (our
  export), else ``epoch * steps_per_epoch`` (an official file records
  epochs only: training resumes at the start of the next one). A file
  with an epoch but no known epoch length resumes at step 0, said in one
  line."""
  if STEP_KEY in raw:
    return int(raw[STEP_KEY])
  if config.steps_per_epoch > 0:
    return epoch * config.steps_per_epoch
  if epoch > 0:
    print(
      f'warning: the checkpoint records epoch {epoch} but no step, and '
      'config.steps_per_epoch is 0 (the epoch length comes from the data): '
      'training resumes at step 0; pass --config.steps_per_epoch=N to '
      f'resume at step {epoch}*N',
      file=sys.stderr,
    )
  return 0


def _reason(error: Exception) -> str:
  return ' '.join(str(error).split()) or type(error).__name__


def _save_new(workdir: str, step: int, state, config) -> None:
  """Saves the first checkpoint; on failure removes what it created."""
  directory = storage.join(workdir, 'checkpoints')
  top = None  # the outermost directory this save creates
  if storage.is_remote(workdir):
    top = directory  # a prefix: nothing exists until the save writes
  else:
    path = os.path.abspath(directory)
    while not os.path.exists(path):
      top, path = path, os.path.dirname(path)
  try:
    ckpt = checkpoint_lib.Checkpointer(directory, async_save=False)
    ckpt.save(step, state, config)
    ckpt.wait()
    ckpt.close()
  except BaseException:
    if top is not None:
      with contextlib.suppress(OSError):
        storage.as_path(top).rmtree()
    raise


def export_checkpoint(workdir: str, path: str, what: str = 'backbone') -> dict:
  """Writes the teacher backbone (as released) or the full networks to .pth.

  ``what='backbone'``: the teacher backbone's 150 official keys (the released
  "backbone only" files). ``what='full'``: ``{'student', 'teacher',
  'dino_loss'}`` with the official prefixes.
  """
  import torch

  config, _, state, step = workdir_lib.load_workdir(workdir)
  student_m, _ = step_lib.build_models(config)

  def state_dict(model, prefix):  # model: 'student' or 'teacher'
    params = getattr(state, model)
    stats = (state.batch_stats or {}).get(model, {})
    out = {}
    for name, module in (
      ('backbone', student_m.backbone),
      ('head', student_m.head),
    ):
      variables = {'params': params[name]}
      if name in stats:  # BatchNorm running statistics
        variables['batch_stats'] = stats[name]
      for key, value in to_pytorch(variables, module).items():
        out[f'{prefix}{name}.{key}'] = torch.from_numpy(np.array(value))
    return out

  if what == 'backbone':
    payload = {
      k[len('backbone.') :]: v
      for k, v in state_dict('teacher', '').items()
      if k.startswith('backbone.')
    }
  elif what == 'full':
    payload = {
      'student': state_dict('student', 'module.'),
      'teacher': state_dict('teacher', ''),
      'dino_loss': {'center': torch.from_numpy(np.array(state.center))},
      'epoch': _epoch_of(config, int(step)),
      STEP_KEY: int(step),  # mid-epoch too; ignored by the official code
    }
  else:
    raise ValueError(f"what={what!r}; use 'backbone' or 'full'")
  data = io.BytesIO()
  torch.save(payload, data)
  storage.write_bytes(path, data.getvalue())  # whole or not at all
  return payload


def _epoch_of(config, step: int) -> int:
  """The epoch ``step`` lies in: by ``steps_per_epoch``, or by the data's
  size when the config leaves the epoch length to the data (as training
  does); 0 when the data cannot be read (the step key still holds it)."""
  per_epoch = config.steps_per_epoch
  if per_epoch <= 0:
    from dino_jax.data import sources

    try:
      size = len(sources.make_source(config.data, config.data.split))
    except (sources.DataError, OSError) as e:
      logger.warning('epoch unknown (%s); the step is in %s', e, STEP_KEY)
      return 0
    per_epoch = max(size // config.batch_size, 1)
  return step // per_epoch
