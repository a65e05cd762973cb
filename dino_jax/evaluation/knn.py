"""Weighted k-NN evaluation (SPEC §7.1); ``python -m dino_jax.eval.knn``.

CLI: ``python -m dino_jax.eval.knn --workdir=DIR [--config.eval.ks=(20,)]``.

Teacher backbone CLS features, L2-normalized; cosine similarity to the train
set (memory); the k nearest vote with weight exp(sim / T), T = 0.07.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import interrupt
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib
from dino_jax.data import sources
from dino_jax.evaluation import common, features

logger = logging.getLogger(__name__)


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(
  jax.jit, static_argnames=('ks', 'temperature', 'num_classes')
)
def _class_scores(
  queries, memory, memory_labels, *, ks, temperature, num_classes
):
  """Weighted votes per class for each k: [len(ks), q, C].

  Module level, features as arguments: one compile per shape, not per call.
  """
  sim = _normalize(queries) @ memory.T  # [q, N] cosine
  top_sim, top_idx = jax.lax.top_k(sim, max(ks))  # sorted, descending
  top_labels = memory_labels[top_idx]  # [q, max_k]
  weights = jnp.exp(top_sim / temperature)
  votes = jax.nn.one_hot(top_labels, num_classes) * weights[..., None]
  cumulative = jnp.cumsum(votes, axis=1)  # [q, max_k, C]
  return jnp.stack([cumulative[:, k - 1] for k in ks])


def knn_classify(
  train_features: np.ndarray,
  train_labels: np.ndarray,
  test_features: np.ndarray,
  test_labels: np.ndarray,
  *,
  ks=(10, 20, 100, 200),
  temperature: float = 0.07,
  num_classes: int | None = None,
  chunk_size: int = 1024,
) -> dict[int, dict[str, float]]:
  """Weighted k-NN top-1 and top-5 accuracy (%) for each k.

  Args:
    train_features: [N, F] memory features (normalized here).
    train_labels: [N] int labels.
    test_features: [M, F] query features.
    test_labels: [M] int labels.
    ks: neighbour counts; each k <= N.
    temperature: T in exp(sim / T).
    num_classes: label count (default: max label + 1).
    chunk_size: queries per chunk (memory only; results do not depend on it).

  Returns:
    {k: {'top1': %, 'top5': %}}; top-5 uses min(5, k) predictions.
  """
  num_classes = (
    num_classes or int(max(train_labels.max(), test_labels.max())) + 1
  )
  ks = tuple(k for k in ks if k <= len(train_labels))
  if not ks:
    raise ValueError(f'every k exceeds the {len(train_labels)} train images')
  memory = _normalize(jnp.asarray(train_features, jnp.float32))
  memory_labels = jnp.asarray(train_labels, jnp.int32)
  total = len(test_labels)
  chunk = min(chunk_size, total)  # one query shape: one compile
  correct1 = np.zeros(len(ks))
  correct5 = np.zeros(len(ks))
  for start in range(0, total, chunk):
    interrupt.check()  # a signal stops the evaluation between chunks
    queries = np.asarray(test_features[start : start + chunk], np.float32)
    labels = np.asarray(test_labels[start : start + chunk])
    n = len(labels)
    queries = np.pad(queries, ((0, chunk - n), (0, 0)))  # last chunk
    class_scores = np.asarray(
      _class_scores(
        queries,
        memory,
        memory_labels,
        ks=ks,
        temperature=temperature,
        num_classes=num_classes,
      )
    )[:, :n]
    order = np.argsort(-class_scores, axis=-1, kind='stable')
    for i, k in enumerate(ks):
      correct1[i] += np.sum(order[i, :, 0] == labels)
      top = order[i, :, : min(5, k)]
      correct5[i] += np.sum(np.any(top == labels[:, None], axis=1))
  return {
    k: {
      'top1': 100.0 * correct1[i] / total,
      'top5': 100.0 * correct5[i] / total,
    }
    for i, k in enumerate(ks)
  }


def format_table(results: dict, title: str = 'k-NN') -> str:
  lines = [f'{title}:', '     k   top-1   top-5']
  for k, r in sorted(results.items(), key=lambda kv: int(kv[0])):
    lines.append(f'  {int(k):4d}  {r["top1"]:6.2f}  {r["top5"]:6.2f}')
  return '\n'.join(lines)


# The tables a k-NN run may score: the trained teacher, and (with
# eval.baselines) the baselines, which later runs keep in knn.json.
TABLES = ('trained', 'random_init', 'raw_pixels')
_SETTINGS = (
  'train_split',
  'test_split',
  'max_train_images',
  'max_test_images',
  'resize_size',
  'crop_size',
  'ks',
  'temperature',
)


def settings(config) -> dict:
  """What a k-NN score depends on besides the weights (for its record)."""
  d = config.data
  return {
    'data': {'source': d.source, 'name': d.name, 'path': d.path},
    'eval': {k: config.eval[k] for k in _SETTINGS},
  }


def title(workdir: str, step: int, name: str = 'trained') -> str:
  """The table's title, the same from training and from the CLI:
  ``k-NN trained (step S)``; for weights imported and not trained since,
  ``k-NN trained (imported FILE.pth, step S)``."""
  imported = workdir_lib.imported_from(workdir)
  if imported and imported.get('step') == step:
    source = imported['source'].rstrip('/').rsplit('/', 1)[-1]
    return f'k-NN {name} (imported {source}, step {step})'
  return f'k-NN {name} (step {step})'


def write_results(workdir: str, name: str, payload: dict, config=None) -> str:
  """WORKDIR/eval/<name>.json and a record (``common.write_record``).

  The baselines of an earlier run stay in knn.json when this one scored
  only the trained features; ``config``: the settings recorded.
  """
  return common.write_record(
    workdir,
    name,
    payload,
    settings=settings(config) if config is not None else None,
    keep=TABLES,
  )


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


def _check_labels(config) -> None:
  """Raises DataError for unlabelled data; warns when queries are memory."""
  e = config.eval
  memory = sources.make_source(config.data, e.train_split)
  if isinstance(memory, sources.ImageFolderSource) and not memory.classes:
    raise sources.DataError(
      f'k-NN needs labels, and {config.data.path} has none (no class '
      'folders); set eval.knn=False, or use ROOT/train/CLASS/*.jpg'
    )
  queries = sources.make_source(config.data, e.test_split)
  if isinstance(queries, sources.ImageFolderSource) and (
    queries.samples == memory.samples
  ):
    logger.warning(
      'k-NN: eval.train_split=%r and eval.test_split=%r are the same images '
      '(no %s/%s folder): the accuracy is not a held-out score',
      e.train_split,
      e.test_split,
      config.data.path,
      e.test_split,
    )


def knn_eval_many(config, mesh, feature_fns: dict) -> dict:
  """k-NN accuracies of several feature maps from one pass over the data.

  Args:
    config: the run config (eval group: splits, sizes, ks, temperature).
    mesh: device mesh for the extraction.
    feature_fns: {name: images [B, S, S, 3] -> [B, F_name]} on global
      arrays, e.g. ``functools.partial(features.jit_feature_fn(model, mesh),
      params)``.

  Returns:
    {name: {k: {'top1', 'top5'}}}. The images are decoded once; every map
    runs on each batch.
  """
  e = config.eval
  _check_labels(config)

  def fn(images):
    return {name: f(images) for name, f in feature_fns.items()}

  (train_x, train_y), classes = _extract(
    config, mesh, fn, e.train_split, e.max_train_images
  )
  (test_x, test_y), _ = _extract(
    config, mesh, fn, e.test_split, e.max_test_images
  )
  results = {}
  for name in feature_fns:
    logger.info(
      'k-NN (%s): %d memory, %d queries, %d-d features',
      name,
      len(train_y),
      len(test_y),
      train_x[name].shape[1],
    )
    results[name] = knn_classify(
      train_x[name],
      train_y,
      test_x[name],
      test_y,
      ks=tuple(e.ks),
      temperature=e.temperature,
      num_classes=len(classes) or None,
    )
  return results


def knn_eval(config, mesh, model, params, label: str = 'trained') -> dict:
  """k-NN accuracies of a backbone's CLS, {k: {'top1', 'top5'}}."""
  fn = functools.partial(features.jit_feature_fn(model, mesh), params)
  return knn_eval_many(config, mesh, {label: fn})[label]


def knn_from_workdir(workdir: str, overrides: list[str] = ()) -> dict:
  """k-NN of the teacher in ``workdir``'s newest checkpoint.

  Args:
    workdir: a training (or import) workdir; read only, except for
      ``WORKDIR/eval/knn.json``.
    overrides: ``--config.eval.*`` (``data.*``, ``mesh.*``) overrides of the
      saved config.

  Returns:
    {k: {'top1', 'top5'}}.
  """
  config, mesh, state, step = workdir_lib.load_workdir(workdir, overrides)
  _, teacher = step_lib.build_models(config)
  params = step_lib.teacher_backbone(state)
  results = knn_eval(config, mesh, teacher.backbone, params)
  print(format_table(results, title(workdir, step)), flush=True)
  path = write_results(
    workdir,
    'knn',
    {'step': step, 'trained': {str(k): v for k, v in results.items()}},
    config,
  )
  if overrides:  # scores of other settings than the training run's
    print(f'settings: {" ".join(overrides)}', flush=True)
  print(f'wrote {path} and a record in eval/records/', flush=True)
  return results
