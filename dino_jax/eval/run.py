"""The evaluations a run does after (or during) training."""

import functools
import logging

import jax
import numpy as np
from dino_jax import step as step_lib
from dino_jax import storage
from dino_jax.data import sources
from dino_jax.eval import attention, features, knn

logger = logging.getLogger(__name__)


def _identity_fn(images):
  return images.reshape(images.shape[0], -1)


def after_training(
  config, workdir, mesh, state, step: int, final: bool = True
) -> dict:
  """Runs the evaluations the config asks for; writes WORKDIR/eval/*.

  ``final=False`` (an ``eval_every_steps`` evaluation during training)
  scores only the trained features: the baselines (random init, raw pixels)
  do not change with the step and are scored once, at the end, with the
  attention maps.
  """
  e = config.eval
  out = {}
  _, teacher = step_lib.build_models(config)
  backbone = teacher.backbone
  params = state.teacher['backbone']
  if e.knn:
    fns = {'trained': features.cls_feature_fn(backbone, params)}
    if e.baselines and final:
      init = jax.jit(
        functools.partial(backbone.init, jax.random.PRNGKey(config.seed + 1))
      )(np.zeros((1, e.crop_size, e.crop_size, 3), np.float32))['params']
      fns['random_init'] = features.cls_feature_fn(backbone, init)
      fns['raw_pixels'] = _identity_fn
    try:
      results = knn.knn_eval_many(config, mesh, fns)
    except sources.DataError as error:  # e.g. a folder without labels
      logger.warning('k-NN skipped: %s', error)
      results = {}
    for name, table in results.items():
      print(knn.format_table(table, f'k-NN {name} (step {step})'), flush=True)
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
      )
    out['knn'] = results
  if final and e.attention_images > 0 and jax.process_index() == 0:
    source = sources.make_source(config.data, e.test_split)
    size = e.attention_size  # shorter side resized to it, centre crop
    if size:
      transform = features.EvalTransform(size, size)
    else:
      transform = features.EvalTransform(e.resize_size, e.crop_size)
    paths = []
    for i in range(min(e.attention_images, len(source))):
      image = transform.map(source[i])['image']
      paths += attention.attention_for_image(
        backbone,
        params,
        image,
        config.model.patch_size,
        e.attention_threshold,
        storage.join(workdir, 'eval', 'attention'),
        f'test{i}',
      )
    logger.info(
      'attention maps: %d files in %s/eval/attention', len(paths), workdir
    )
    out['attention'] = paths
  return out
