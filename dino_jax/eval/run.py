"""Evaluation after (or during) training, and loading a workdir for the CLIs."""

import ast
import functools
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dino_jax import checkpoint as checkpoint_lib
from dino_jax import parallel
from dino_jax import step as step_lib
from dino_jax.data import sources
from dino_jax.eval import attention, features, knn

logger = logging.getLogger(__name__)


def _extract(config, mesh, fn, split, max_images):
  source = sources.make_source(config.data, split)
  return features.extract(
    fn,
    source,
    mesh=mesh,
    batch_size=config.eval.batch_size,
    resize_size=config.eval.resize_size,
    crop_size=config.eval.crop_size,
    max_images=max_images,
    num_workers=config.data.num_workers,
  ), getattr(source, 'classes', ())


def knn_eval_many(config, mesh, feature_fns: dict) -> dict:
  """k-NN accuracies of several feature maps from one pass over the data.

  Args:
    config: the run config (eval group: splits, sizes, ks, temperature).
    mesh: device mesh for the extraction.
    feature_fns: {name: jittable images [B, S, S, 3] -> [B, F_name]}.

  Returns:
    {name: {k: {'top1', 'top5'}}}. The images are decoded once; every map
    runs on each batch in one jitted call and the columns are split after.
  """
  names = list(feature_fns)
  e = config.eval
  probe = jax.ShapeDtypeStruct((1, e.crop_size, e.crop_size, 3), np.float32)
  widths = [jax.eval_shape(feature_fns[n], probe).shape[-1] for n in names]
  bounds = np.cumsum([0] + widths)

  def fn(images):
    return jnp.concatenate(
      [feature_fns[n](images).astype(jnp.float32) for n in names], axis=-1
    )

  (train_x, train_y), classes = _extract(
    config, mesh, fn, e.train_split, e.max_train_images
  )
  (test_x, test_y), _ = _extract(
    config, mesh, fn, e.test_split, e.max_test_images
  )
  results = {}
  for i, name in enumerate(names):
    lo, hi = bounds[i], bounds[i + 1]
    logger.info(
      'k-NN (%s): %d memory, %d queries, %d-d features',
      name,
      len(train_y),
      len(test_y),
      hi - lo,
    )
    results[name] = knn.knn_classify(
      train_x[:, lo:hi],
      train_y,
      test_x[:, lo:hi],
      test_y,
      ks=tuple(e.ks),
      temperature=e.temperature,
      num_classes=len(classes) or None,
    )
  return results


def knn_eval(config, mesh, model, params, label: str = 'trained') -> dict:
  """k-NN accuracies of a backbone, {k: {'top1', 'top5'}}."""
  fn = features.cls_feature_fn(model, params)
  return knn_eval_many(config, mesh, {label: fn})[label]


def _identity_fn(images):
  return images.reshape(images.shape[0], -1)


def after_training(config, workdir, mesh, state, step: int) -> dict:
  """Runs the evaluations the config asks for; writes WORKDIR/eval/*."""
  e = config.eval
  out = {}
  _, teacher = step_lib.build_models(config)
  backbone = teacher.backbone
  params = state.teacher['backbone']
  if e.knn:
    fns = {'trained': features.cls_feature_fn(backbone, params)}
    if e.baselines:
      init = jax.jit(
        functools.partial(backbone.init, jax.random.PRNGKey(config.seed + 1))
      )(np.zeros((1, e.crop_size, e.crop_size, 3), np.float32))['params']
      fns['random_init'] = features.cls_feature_fn(backbone, init)
      fns['raw_pixels'] = _identity_fn
    results = knn_eval_many(config, mesh, fns)
    for name, table in results.items():
      print(knn.format_table(table, f'k-NN {name} (step {step})'), flush=True)
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
  if e.attention_images > 0 and jax.process_index() == 0:
    source = sources.make_source(config.data, e.test_split)
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
        os.path.join(workdir, 'eval', 'attention'),
        f'test{i}',
      )
    logger.info(
      'attention maps: %d files in %s/eval/attention', len(paths), workdir
    )
    out['attention'] = paths
  return out


def _cast(old, value: str):
  if isinstance(old, bool):
    if value.lower() not in ('true', 'false'):
      raise ValueError(f'expected true or false, got {value!r}')
    return value.lower() == 'true'
  if isinstance(old, (list, tuple)):
    return tuple(ast.literal_eval(value))
  return type(old)(value) if old is not None else ast.literal_eval(value)


def parse_overrides(items: list[str]) -> dict[str, str]:
  """['eval.ks=(10, 20)', ...] -> {'eval.ks': '(10, 20)'}."""
  out = {}
  for item in items:
    if '=' not in item:
      raise ValueError(f'override {item!r} is not key=value')
    key, value = item.split('=', 1)
    out[key.strip()] = value.strip()
  return out


def knn_from_workdir(workdir: str, overrides: dict | None = None) -> dict:
  """k-NN of the teacher in ``workdir``'s latest checkpoint."""
  config, mesh, state, step = load_workdir(workdir, overrides)
  _, teacher = step_lib.build_models(config)
  results = knn_eval(config, mesh, teacher.backbone, state.teacher['backbone'])
  print(knn.format_table(results, f'k-NN teacher (step {step})'), flush=True)
  path = knn.write_results(
    workdir,
    'knn',
    {'step': step, 'trained': {str(k): v for k, v in results.items()}},
  )
  logger.info('wrote %s', path)
  return results


def load_workdir(workdir: str, overrides: dict | None = None):
  """(config, mesh, state) from the latest checkpoint in ``workdir``."""
  path = os.path.join(workdir, 'checkpoints')
  ckpt = checkpoint_lib.Checkpointer(path, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(
      f'no checkpoint in {path}; train first or check --workdir'
    )
  config = ml_collections.ConfigDict(ckpt.saved_config(step))
  for key, value in (overrides or {}).items():
    *groups, name = key.split('.')
    target = config
    for group in groups:
      target = target[group]
    if name not in target:
      raise KeyError(f'unknown config field {key!r}')
    target[name] = _cast(target[name], value)
  _, _, init_fn = step_lib.state_template(config)
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
  shape = jax.eval_shape(init_fn)
  state = ckpt.restore(
    step,
    checkpoint_lib.abstract_like(
      shape, parallel.state_sharding(mesh, shape, config.mesh.fsdp_min_size)
    ),
  )
  ckpt.close()
  return config, mesh, state, step
