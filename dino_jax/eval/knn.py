"""Weighted k-NN evaluation (SPEC §7.1); ``python -m dino_jax.eval.knn``.

Teacher backbone CLS features, L2-normalized; cosine similarity to the train
set (memory); the k nearest vote with weight exp(sim / T), T = 0.07.
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import hostmem

logger = logging.getLogger(__name__)


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


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
  max_k = max(ks)
  memory = _normalize(jnp.asarray(train_features, jnp.float32))
  memory_labels = jnp.asarray(train_labels, jnp.int32)

  @jax.jit
  def scores(queries, memory, memory_labels):  # arguments, not constants
    sim = _normalize(queries) @ memory.T  # [q, N] cosine
    top_sim, top_idx = jax.lax.top_k(sim, max_k)  # sorted, descending
    top_labels = memory_labels[top_idx]  # [q, max_k]
    weights = jnp.exp(top_sim / temperature)
    votes = jax.nn.one_hot(top_labels, num_classes) * weights[..., None]
    cumulative = jnp.cumsum(votes, axis=1)  # [q, max_k, C]
    return jnp.stack([cumulative[:, k - 1] for k in ks])  # [len(ks), q, C]

  correct1 = np.zeros(len(ks))
  correct5 = np.zeros(len(ks))
  for start in range(0, len(test_labels), chunk_size):
    queries = jnp.asarray(test_features[start : start + chunk_size])
    labels = np.asarray(test_labels[start : start + chunk_size])
    class_scores = np.asarray(scores(queries, memory, memory_labels))
    order = np.argsort(-class_scores, axis=-1, kind='stable')
    for i, k in enumerate(ks):
      correct1[i] += np.sum(order[i, :, 0] == labels)
      top = order[i, :, : min(5, k)]
      correct5[i] += np.sum(np.any(top == labels[:, None], axis=1))
  total = len(test_labels)
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


def write_results(workdir: str, name: str, payload: dict) -> str:
  """Writes WORKDIR/eval/<name>.json (process 0 only); returns the path."""
  path = os.path.join(workdir, 'eval', f'{name}.json')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(payload, f, indent=2)
  return path


def _main():
  from absl import app, flags
  from ml_collections import config_flags

  flags.DEFINE_string('workdir', None, 'Training workdir (its checkpoint).')
  flags.DEFINE_multi_string(
    'set', [], 'Config override key=value, e.g. eval.max_train_images=5000'
  )
  flags.DEFINE_string(
    'pretrained',
    None,
    'An official DINO .pth (backbone-only or full checkpoint): imported '
    'into --workdir first (needs --config for the architecture and data).',
  )
  config_flags.DEFINE_config_file(
    'config', None, 'Model/data config, with --pretrained.'
  )
  flags.mark_flag_as_required('workdir')

  def main(argv):
    del argv
    from dino_jax import checkpoint, interop
    from dino_jax.eval import run

    logging.getLogger('absl').setLevel(logging.WARNING)
    f = flags.FLAGS
    if f.pretrained:
      if f.config is None:
        raise app.UsageError('--pretrained needs --config=configs/<model>.py')
      ckpt = checkpoint.Checkpointer(f'{f.workdir}/checkpoints')
      existing = ckpt.latest_step()
      ckpt.close()
      if existing is None:
        interop.import_checkpoint(f.pretrained, f.workdir, f.config)
      else:
        logging.warning(
          '%s already holds a checkpoint (step %d); not importing again',
          f.workdir,
          existing,
        )
    run.knn_from_workdir(f.workdir, run.parse_overrides(f.set))

  app.run(main)


if __name__ == '__main__':
  hostmem.reexec_if_needed()  # glibc malloc settings for XLA:CPU
  _main()
