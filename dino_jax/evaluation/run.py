"""The evaluations a run does after (or during) training."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import interrupt, parallel, storage
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib
from dino_jax.data import sources
from dino_jax.evaluation import (
  attention,
  common,
  copy_detection,
  features,
  knn,
  linear,
  retrieval,
  video,
)

logger = logging.getLogger(__name__)


def _random_init(config, mesh, backbone):
  """The backbone at random init (seed + 1), sharded as the teacher's."""
  size = config.eval.crop_size
  init = functools.partial(
    backbone.init,
    jax.random.PRNGKey(config.seed + 1),
    jnp.zeros((1, size, size, 3), jnp.float32),
  )

  def variables():  # a ResNet's also its running statistics (0 and 1)
    out = init()
    return out if 'batch_stats' in out else out['params']

  shape = jax.eval_shape(variables)
  # The teacher's rules on the same shapes: the same shardings, so both
  # run through one compiled feature function.
  shardings = parallel.state_sharding(mesh, shape, config.mesh.fsdp_min_size)
  return jax.jit(variables, out_shardings=shardings)()


def _is_vit(config) -> bool:
  """Whether the backbone is a ViT; else the attention evaluations
  configured are skipped with a warning."""
  e = config.eval
  try:
    common.require_vit(config, 'attention maps and masks')
  except workdir_lib.WorkdirError as error:
    if e.attention_images > 0 or e.mask_jaccard_images > 0:
      logger.warning('attention evaluations skipped: %s', error)
    return False
  return True


def after_training(
  config, workdir, mesh, state, step: int, final: bool = True
) -> dict:
  """Runs the evaluations the config asks for; writes WORKDIR/eval/*.

  ``final=False`` (an ``eval_every_steps`` evaluation during training)
  scores only the trained features: the baselines (random init, raw pixels)
  do not change with the step and are scored once, at the end, with the
  attention maps. At the end, the linear probe, the mask Jaccard and the
  downstream protocols (``downstream``) go to WORKDIR/eval/downstream.json.
  """
  e = config.eval
  out = {}
  _, teacher = step_lib.build_models(config)
  backbone = teacher.backbone
  params = step_lib.teacher_backbone(state)
  if e.knn:
    cls = features.jit_feature_fn(backbone, mesh)
    fns = {'trained': functools.partial(cls, params)}
    if e.baselines and final:
      init = _random_init(config, mesh, backbone)
      fns['random_init'] = functools.partial(cls, init)
      pixels = features.jit_feature_fn(None, mesh, 'pixels')
      fns['raw_pixels'] = functools.partial(pixels, None)
    try:
      results = knn.knn_eval_many(config, mesh, fns)
    except sources.DataError as error:  # e.g. a folder without labels
      logger.warning('k-NN skipped: %s', error)
      results = {}
    for name, table in results.items():
      title = knn.title(workdir, step, name)
      print(knn.format_table(table, title), flush=True)
    interrupt.check()  # nothing partial: all of the k-NN results or none
    if results:
      knn.write_results(
        workdir,
        'knn',
        {
          'step': step,
          **{
            name: {str(k): v for k, v in table.items()}
            for name, table in results.items()
          },
        },
        config,
      )
    out['knn'] = results
  if final and e.linear:
    out['linear'] = _linear_sweeps(config, mesh, backbone, params, step)
  vit = _is_vit(config)  # attention needs patch tokens; a ResNet has none
  if final and e.mask_jaccard_images > 0 and vit:
    out['mask_jaccard'] = _mask_jaccard(config, mesh, backbone, params, step)
  if final:
    out.update(downstream(config, workdir, mesh, backbone, params, step))
  record = {k: out[k] for k in DOWNSTREAM if k in out}
  if final and record:
    interrupt.check()  # nothing partial
    common.write_record(workdir, 'downstream', {'step': step, **record})
  if final and e.attention_images > 0 and vit:  # every process takes part
    interrupt.check()
    source = sources.make_source(config.data, e.test_split)
    size = e.attention_size  # shorter side resized to it, centre crop
    if size:
      transform = features.EvalTransform(size, size)
    else:
      transform = features.EvalTransform(e.resize_size, e.crop_size)
    n = min(e.attention_images, len(source))
    paths = attention.attention_maps(
      backbone,
      params,
      np.stack([transform.map(source[i])['image'] for i in range(n)]),
      config.model.patch_size,
      e.attention_threshold,
      storage.join(workdir, 'eval', 'attention'),
      [f'test{i}' for i in range(n)],
      mesh,
    )
    logger.info(
      'attention maps: %d files in %s/eval/attention', len(paths), workdir
    )
    out['attention'] = paths
  return out


# What eval/downstream.json holds (those the config turned on).
DOWNSTREAM = ('linear', 'mask_jaccard', 'retrieval', 'copy_detection', 'davis')
# A protocol whose data is wrong is skipped with a warning: the run, done,
# keeps its other results (the CLI gives the same error as one line).
_DATA_ERRORS = (
  workdir_lib.WorkdirError,
  workdir_lib.ConfigOverrideError,
  copy_detection.CopydaysError,
)


def downstream(config, workdir, mesh, backbone, params, step: int) -> dict:
  """The protocols whose data the config names: {name: record}.

  Retrieval (``eval.retrieval_root``), copy detection
  (``eval.copydays_root``, in batches of ``eval.batch_size``), DAVIS
  (``eval.davis_root``; PNGs into WORKDIR/eval/davis/): each the record
  its CLI writes (without the step), from the same function, on the
  trained backbone. Every process takes part; process 0 writes.
  """
  e = config.eval
  runs = {}
  if e.retrieval_root:
    runs['retrieval'] = lambda: retrieval.retrieval_evaluation(
      config,
      mesh,
      backbone,
      params,
      data_root=e.retrieval_root,
      dataset=e.retrieval_dataset,
      imsize=e.retrieval_imsize,
      multiscale=e.retrieval_multiscale,
    )
  if e.copydays_root:
    runs['copy_detection'] = lambda: copy_detection.copy_detection_evaluation(
      config,
      mesh,
      backbone,
      params,
      data_root=e.copydays_root,
      distractors=e.copydays_distractors,
      whitening=e.copydays_whitening,
      imsize=e.copydays_imsize,
      batch_size=e.batch_size,
    )
  if e.davis_root:
    runs['davis'] = lambda: video.video_evaluation(
      config,
      mesh,
      backbone,
      params,
      davis_root=e.davis_root,
      split=e.davis_split,
      size=e.davis_size,
      write=lambda rel, data: common.write_bytes(workdir, f'davis/{rel}', data),
    )
  formats = {
    'retrieval': lambda r: retrieval.format_results(r['dataset'], r, step),
    'copy_detection': lambda r: copy_detection.format_results(r, step),
    'davis': lambda r: video.format_results(r, step),
  }
  out = {}
  for name, run in runs.items():
    interrupt.check()
    try:
      out[name] = run()
    except _DATA_ERRORS as error:
      logger.warning('%s skipped: %s', name, error)
      continue
    print(formats[name](out[name]), flush=True)
  return out


def _baselines(config, mesh, backbone, params, pixels: bool):
  """{'trained': ..., 'random_init': ..., ['raw_pixels']} (backbone, params).

  The baselines only with ``eval.baselines``; raw pixels where the
  evaluation takes them (``backbone`` None).
  """
  models = {'trained': (backbone, params)}
  if config.eval.baselines:
    models['random_init'] = (backbone, _random_init(config, mesh, backbone))
    if pixels:
      models['raw_pixels'] = (None, None)
  return models


def _linear_sweeps(config, mesh, backbone, params, step: int) -> dict:
  """The lr-swept linear probe's test top-1 of each model (eval.linear)."""
  results = {}
  for name, (model, p) in _baselines(
    config, mesh, backbone, params, True
  ).items():
    interrupt.check()
    r = linear.linear_sweep_eval(config, mesh, model, p)
    results[name] = {
      'top1': r['top1'],
      'top5': r['top5'],
      'lr': r['chosen_lr'],
    }
  lines = [
    f'linear probe, lr swept (step {step}):',
    '  model         top-1    lr',
  ]
  for name, r in results.items():
    lines.append(f'  {name:12s}  {r["top1"]:6.2f}  {r["lr"]:.2g}')
  print('\n'.join(lines), flush=True)
  return results


def silhouette_images(config, n: int):
  """The first n test images at their own size, and their silhouettes.

  Fashion-MNIST: the item is every pixel > 0 (the background is 0).
  """
  source = sources.make_source(config.data, config.eval.test_split)
  n = min(n, len(source))
  records = [source[i] for i in range(n)]
  size = records[0]['image'].shape[0]
  transform = features.EvalTransform(size, size)
  images = np.stack([transform.map(r)['image'] for r in records])
  silhouettes = np.stack([_gray(r['image']) > 0 for r in records])
  return images, silhouettes


def _gray(image) -> np.ndarray:
  image = np.asarray(image)
  return image if image.ndim == 2 else image.max(axis=-1)


def _mask_jaccard(config, mesh, backbone, params, step: int) -> dict:
  """The best head's attention-mask Jaccard vs the silhouette (percent)."""
  if config.data.source != 'fashion_mnist':
    logger.warning(
      'mask Jaccard skipped: silhouettes need data.source=fashion_mnist'
    )
    return {}
  images, silhouettes = silhouette_images(
    config, config.eval.mask_jaccard_images
  )
  results = {}
  for name, (model, p) in _baselines(
    config, mesh, backbone, params, False
  ).items():
    interrupt.check()
    results[name] = 100 * attention.mask_jaccard_eval(
      config, mesh, model, p, images, silhouettes
    )
  t = config.eval.attention_threshold
  lines = [
    f'attention mask Jaccard, best head, {t:g} of the mass, '
    f'{len(images)} test images (step {step}):'
  ]
  lines += [f'  {name:12s}  {v:6.2f}' for name, v in results.items()]
  print('\n'.join(lines), flush=True)
  return results


# The training loop's side of the evaluations (train.py).


def during_training(config, workdir, mesh, state, step: int, final: bool):
  """``after_training``, or None when a signal stopped it.

  One process stops between batches (``interrupt.check``) so that the
  run saves and exits within the scheduler's grace period; an evaluation
  writes nothing partial. Several processes evaluate to the end.
  """
  try:
    interrupt.check()
    return after_training(config, workdir, mesh, state, step, final)
  except interrupt.Stopped:
    return None
  except Exception as error:
    if interrupt.requested() is None:
      raise
    # Stopped by the signal some other way (e.g. a data worker killed with
    # the process group): the train state is whole.
    logger.warning(
      'evaluation failed after the signal: %s', ' '.join(str(error).split())
    )
    return None


def missing(config, writer, step: int, total_steps: int) -> bool:
  """Whether ``step``, restored, is an ``eval_every_steps`` step whose k-NN
  is not in ``metrics.jsonl`` (the same answer on every process)."""
  every = config.eval_every_steps
  if not (config.eval.knn and every > 0 and 0 < step < total_steps):
    return False
  if step % every:
    return False
  absent = not writer.has_evaluation(step) if writer.active else False
  if jax.process_count() > 1:  # process 0 holds metrics.jsonl
    from jax.experimental import multihost_utils

    absent = bool(multihost_utils.broadcast_one_to_all(np.int32(absent)))
  return absent


def knn_scalars(results: dict) -> dict[str, float]:
  """k-NN top-1 per feature set and k, as metrics.jsonl columns.

  e.g. ``knn_trained_k20``: the learning curve (``python -m dino_jax.plot``).
  """
  return {
    f'knn_{name}_k{int(k)}': float(row['top1'])
    for name, table in results.get('knn', {}).items()
    for k, row in table.items()
  }
