"""The evaluation CLIs: ``python -m dino_jax.eval.<name>``.

The evaluations are library code (``dino_jax/evaluation/<name>.py``): a
function of (config, mesh, backbone, params, options). Their commands are
here: the flags (``define_<name>``), ``main_<name>(values, args,
overrides)`` and the errors each reports in one line, run by
``flags.run_cli``; ``dino_jax/eval/<name>.py`` is the program, which calls
``entry(<name>)``.
"""

import logging
import sys

from absl import flags

from dino_jax import storage
from dino_jax import workdir as workdir_lib
from dino_jax.cli import flags as cli_flags
from dino_jax.workdir import ConfigOverrideError, WorkdirError

logger = logging.getLogger(__name__)


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
    raise WorkdirError('--workdir is required; pass a directory')
  if values.config and not values.pretrained:
    raise ConfigOverrideError(
      f'--config={values.config} is only read with --pretrained; the '
      'workdir holds its own config (override fields with --config.a.b=c)'
    )
  if not values.pretrained:
    return list(overrides)
  if not values.config:
    raise ConfigOverrideError(
      '--pretrained needs --config=configs/<model>.py (the architecture)'
    )
  if workdir_lib.has_checkpoint(values.workdir):
    logger.warning(
      '%s already holds a checkpoint; not importing %s again',
      values.workdir,
      values.pretrained,
    )
  else:
    config = cli_flags.load_config_file(values.config, overrides)
    from dino_jax import pth  # torch only here

    pth.import_checkpoint(values.pretrained, values.workdir, config)
  # The other overrides shaped the imported model; the rest is for the eval.
  return [o for o in overrides if _group(o) in workdir_lib.EVAL_GROUPS]


def load_teacher(values: flags.FlagValues, overrides: list[str]):
  """The teacher backbone of the tool's workdir (after any import).

  Returns:
    (config, mesh, backbone module, backbone params, step).
  """
  from dino_jax import step as step_lib

  overrides = prepare_workdir(values, overrides)
  config, mesh, state, step = workdir_lib.load_workdir(
    values.workdir, overrides
  )
  _, teacher = step_lib.build_models(config)
  return config, mesh, teacher.backbone, step_lib.teacher_backbone(state), step


def _no_arguments(args: list[str]) -> None:
  if args:
    raise ConfigOverrideError(f'unexpected arguments: {args}')


# k-NN and the linear probe: the shared flags only.


def define_knn(values: flags.FlagValues) -> None:
  cli_flags.define_eval_flags(values)


def main_knn(values: flags.FlagValues, args: list[str], overrides: list[str]):
  """``python -m dino_jax.eval.knn``: k-NN of a workdir (after --pretrained)."""
  from dino_jax.evaluation import knn

  _no_arguments(args)
  overrides = prepare_workdir(values, overrides)
  knn.knn_from_workdir(values.workdir, overrides)


def define_linear(values: flags.FlagValues) -> None:
  cli_flags.define_eval_flags(values)


def main_linear(
  values: flags.FlagValues, args: list[str], overrides: list[str]
):
  """``python -m dino_jax.eval.linear --workdir=DIR [--config.linear.x=y]``."""
  from dino_jax.evaluation import linear

  _no_arguments(args)
  overrides = prepare_workdir(values, overrides)
  linear.linear_from_workdir(values.workdir, overrides)


# Attention maps of one image.


def define_attention(values: flags.FlagValues) -> None:
  kw = {'flag_values': values}
  cli_flags.define_eval_flags(values)
  flags.DEFINE_string('image', None, 'Image file.', **kw)
  flags.DEFINE_integer(
    'image_size',
    0,
    "Resize to this square size (0: the config's eval.attention_size, "
    'else eval.crop_size).',
    **kw,
  )
  flags.DEFINE_float(
    'threshold', 0.6, 'Attention mass kept by the masks.', **kw
  )
  flags.DEFINE_string(
    'output_dir', None, 'Default WORKDIR/eval/attention.', **kw
  )


def main_attention(
  values: flags.FlagValues, args: list[str], overrides: list[str]
):
  """``python -m dino_jax.eval.attention``: PNGs per head, paths printed.

  Per head: the map, the masked image and the bare mask
  (``{stem}-binmask{i}.png``, ``masks`` at --threshold, upsampled by p).
  """
  from dino_jax.evaluation import attention

  _no_arguments(args)
  for name in ('workdir', 'image'):
    if not values[name].value:
      raise ConfigOverrideError(f'--{name} is required')
  if values.image_size < 0:
    raise ConfigOverrideError(
      f'--image_size={values.image_size} is negative; pass a side in '
      "pixels, or 0 for the config's eval.attention_size"
    )
  if not 0 < values.threshold <= 1:
    raise ConfigOverrideError(
      f'--threshold={values.threshold} is outside (0, 1]; pass the fraction '
      'of attention mass the masks keep (the paper: 0.6)'
    )
  if not storage.as_path(values.image).is_file():
    raise WorkdirError(
      f'--image={values.image} is not a file; pass an image file'
    )
  overrides = prepare_workdir(values, overrides)
  paths = attention.attention_from_workdir(
    values.workdir,
    values.image,
    values.image_size,
    values.threshold,
    values.output_dir,
    overrides,
  )
  print('\n'.join(paths))


# Retrieval on revisited Oxford / Paris.


def define_retrieval(values: flags.FlagValues) -> None:
  from dino_jax.evaluation.retrieval import DATASETS

  cli_flags.define_eval_flags(values)
  kw = {'flag_values': values}
  flags.DEFINE_string(
    'data_root', None, 'Folder holding roxford5k/ and rparis6k/.', **kw
  )
  flags.DEFINE_enum('dataset', 'roxford5k', DATASETS, 'Which dataset.', **kw)
  flags.DEFINE_integer(
    'imsize', 224, 'thumbnail((imsize, imsize)): the longer side.', **kw
  )
  flags.DEFINE_bool(
    'multiscale',
    False,
    'Mean of the features at scales 1, 1/sqrt(2), 1/2.',
    **kw,
  )
  flags.DEFINE_bool(
    'official',
    False,
    "Queries uncropped, as the official code (the paper's numbers); "
    'default: cropped to their bbx (the revisitop protocol).',
    **kw,
  )


def main_retrieval(
  values: flags.FlagValues, args: list[str], overrides: list[str]
):
  """``python -m dino_jax.eval.retrieval``: rOxford / rParis mAP."""
  from dino_jax.evaluation import common, retrieval

  _no_arguments(args)
  retrieval.check_imsize(values.imsize)
  if not values.workdir:
    raise WorkdirError('--workdir is required; pass a directory')
  # The data is checked before anything is imported or written.
  retrieval.load_dataset(values.data_root, values.dataset)
  config, mesh, backbone, params, step = load_teacher(values, overrides)
  record = retrieval.retrieval_evaluation(
    config,
    mesh,
    backbone,
    params,
    data_root=values.data_root,
    dataset=values.dataset,
    imsize=values.imsize,
    multiscale=values.multiscale,
    official=values.official,
  )
  print(retrieval.format_results(values.dataset, record, step), flush=True)
  path = common.write_record(
    values.workdir, f'retrieval_{values.dataset}', {'step': step, **record}
  )
  logger.info('wrote %s', path)


# Copy detection on Copydays.


def define_copy_detection(values: flags.FlagValues) -> None:
  cli_flags.define_eval_flags(values)
  kw = {'flag_values': values}
  flags.DEFINE_string(
    'data_root', None, 'Copydays root (original/, strong/, ...).', **kw
  )
  flags.DEFINE_string(
    'distractors', None, 'Folder of distractor images (database).', **kw
  )
  flags.DEFINE_string(
    'whitening', None, 'Folder of images to learn the PCA whitening on.', **kw
  )
  flags.DEFINE_integer('imsize', 320, 'Square resize of every image.', **kw)
  flags.DEFINE_integer('batch_size', 16, 'Images per batch.', **kw)
  flags.DEFINE_boolean(
    'official',
    False,
    "The official code's uncentred whitening covariance X^T X / n.",
    **kw,
  )


def main_copy_detection(
  values: flags.FlagValues, args: list[str], overrides: list[str]
):
  """``python -m dino_jax.eval.copy_detection``: mAP per Copydays block."""
  from dino_jax.evaluation import common
  from dino_jax.evaluation import copy_detection as cd

  _no_arguments(args)
  options = dict(
    data_root=values.data_root,
    distractors=values.distractors,
    whitening=values.whitening,
    imsize=values.imsize,
    batch_size=values.batch_size,
  )
  cd.plan(**options)  # checked before anything is imported or written
  config, mesh, model, params, step = load_teacher(values, overrides)
  record = cd.copy_detection_evaluation(
    config, mesh, model, params, official=values.official, **options
  )
  print(cd.format_results(record, step), flush=True)
  path = common.write_record(
    values.workdir, 'copy_detection', {'step': step, **record}
  )
  logger.info('wrote %s', path)
  return {name: b['mAP'] for name, b in record['blocks'].items()}


# Video object segmentation on DAVIS.


def define_video(values: flags.FlagValues) -> None:
  cli_flags.define_eval_flags(values)
  kw = {'flag_values': values}
  flags.DEFINE_string('davis_root', None, 'The DAVIS 2017 folder.', **kw)
  flags.DEFINE_string('split', 'val', 'ImageSets/2017/<split>.txt.', **kw)
  flags.DEFINE_integer('size', 480, 'Short side of the frames.', **kw)
  flags.DEFINE_integer(
    'n_last_frames', 7, 'Previous frames in the context.', **kw
  )
  flags.DEFINE_integer(
    'size_mask_neighborhood',
    12,
    'Window radius in patches (0: no window).',
    **kw,
  )
  flags.DEFINE_integer('topk', 5, 'Sources kept per target patch.', **kw)
  flags.DEFINE_bool(
    'official',
    False,
    "The official code's std 0.228 and one-hot depth from the resized "
    'first mask.',
    **kw,
  )


def main_video(values: flags.FlagValues, args: list[str], overrides: list[str]):
  """``python -m dino_jax.eval.video``: DAVIS J&F of a workdir."""
  from dino_jax.evaluation import common, video

  _no_arguments(args)
  options = dict(
    size=values.size,
    n_last_frames=values.n_last_frames,
    size_mask_neighborhood=values.size_mask_neighborhood,
    topk=values.topk,
  )
  video.check_options(values.davis_root, **options)
  video.list_videos(values.davis_root, values.split)  # before any write
  config, mesh, backbone, params, step = load_teacher(values, overrides)
  record = video.video_evaluation(
    config,
    mesh,
    backbone,
    params,
    davis_root=values.davis_root,
    split=values.split,
    official=values.official,
    write=lambda rel, data: common.write_bytes(
      values.workdir, f'davis/{rel}', data
    ),
    **options,
  )
  path = common.write_record(values.workdir, 'davis', {'step': step, **record})
  print(video.format_results(record, step), flush=True)
  logger.info('wrote %s', path)


def errors(name: str) -> tuple[type[BaseException], ...]:
  """What the evaluation ``name`` reports as one ``error:`` line besides
  the workdir's, the overrides' and the checkpoints' errors."""
  from dino_jax.data.sources import DataError
  from dino_jax.models.convert import InteropError

  if name == 'copy_detection':
    from dino_jax.evaluation.copy_detection import CopydaysError

    return (CopydaysError, InteropError)
  if name in ('knn', 'linear'):
    return (DataError, InteropError)
  if name == 'attention':
    return ()
  return (InteropError,)


NAMES = ('knn', 'linear', 'attention', 'retrieval', 'copy_detection', 'video')


def command(name: str):
  """(define_flags, main) of ``python -m dino_jax.eval.<name>``."""
  if name not in NAMES:
    raise ValueError(f'no evaluation CLI {name!r}; one of {NAMES}')
  module = sys.modules[__name__]
  return getattr(module, f'define_{name}'), getattr(module, f'main_{name}')


def run(name: str, argv: list[str] | None = None) -> int:
  """Runs ``python -m dino_jax.eval.<name>``; its exit status.

  ``argv`` None: ``sys.argv`` (the command); tests pass a list.
  """
  define, main = command(name)
  return cli_flags.run_cli(
    define,
    main,
    argv,
    errors=errors(name),
    program=f'dino_jax.eval.{name}',
  )


def entry(name: str) -> None:
  """``dino_jax/eval/<name>.py`` run as a program."""
  from dino_jax import hostmem

  if name != 'attention':  # one image: nothing to gain
    hostmem.configure()  # glibc malloc settings for XLA:CPU, before JAX runs
  sys.exit(run(name))
