"""The evaluations a run does after (or during) training."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import interrupt, parallel, storage
from dino_jax import step as step_lib
from dino_jax.data import sources
from dino_jax.eval import attention, features, knn

logger = logging.getLogger(__name__)


def _random_init(config, mesh, backbone):
  """The backbone at random init (seed + 1), sharded as the teacher's."""
  size = config.eval.crop_size
  init = functools.partial(
    backbone.init,
    jax.random.PRNGKey(config.seed + 1),
    jnp.zeros((1, size, size, 3), jnp.float32),
  )
  shape = jax.eval_shape(init)['params']
  # The teacher's rules on the same shapes: the same shardings, so both
  # run through one compiled feature function.
  shardings = parallel.state_sharding(mesh, shape, config.mesh.fsdp_min_size)
  return jax.jit(lambda: init()['params'], out_shardings=shardings)()


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
      print(knn.format_table(table, f'k-NN {name} (step {step})'), flush=True)
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
      )
    out['knn'] = results
  if final and e.attention_images > 0:  # every process takes part
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
