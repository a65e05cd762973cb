"""Linear probe on frozen features (SPEC §7.2).

CLI: ``python -m dino_jax.eval.linear --workdir=DIR`` (overrides such as
``--config.linear.epochs=10``).

Features: CLS tokens of the last ``n_last_blocks`` blocks (each after the
final norm) concatenated; with ``avgpool`` (n = 1) the CLS and the mean patch
token are interleaved element-wise. A linear layer (weight N(0, 0.01^2), bias
0) is trained with SGD momentum 0.9, no weight decay, lr = lr * B / 256 with
a cosine schedule stepped once per epoch to 0; cross-entropy. Validation
after every epoch; the result is the best validation top-1.
"""

import functools
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from dino_jax import hostmem, interrupt, parallel
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib
from dino_jax.data import multicrop, pipeline, sources
from dino_jax.data.sources import DataError
from dino_jax.eval import features, knn

logger = logging.getLogger(__name__)


probe_features = features.probe_features  # [B, H, W, 3] -> [B, F]


def epoch_lrs(base_lr: float, epochs: int) -> np.ndarray:
  """CosineAnnealingLR(T_max=epochs, eta_min=0), one value per epoch."""
  e = np.arange(epochs)
  return 0.5 * base_lr * (1 + np.cos(np.pi * e / epochs))


def init_linear(key, dim: int, num_classes: int):
  return {
    'kernel': 0.01 * jax.random.normal(key, (dim, num_classes)),
    'bias': jnp.zeros((num_classes,)),
  }


def _loss(linear, feats, labels):
  logits = feats @ linear['kernel'] + linear['bias']
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(linear, feats, labels) -> tuple[float, float]:
  logits = np.asarray(feats @ linear['kernel'] + linear['bias'])
  order = np.argsort(-logits, axis=1)
  top1 = np.mean(order[:, 0] == labels) * 100
  top5 = np.mean(np.any(order[:, :5] == labels[:, None], axis=1)) * 100
  return float(top1), float(top5)


def _train_crops(key, batch, size):
  """RandomResizedCrop(size, (0.08, 1), bilinear) + flip, normalized."""

  def one(k, image, hw):
    k_box, k_flip = jax.random.split(k)
    box = multicrop.sample_crop_box(k_box, hw[0], hw[1], (0.08, 1.0))
    x = multicrop.resized_crop(image, box, size, kernel='bilinear')
    x = jnp.where(jax.random.uniform(k_flip) < 0.5, x[:, ::-1], x)
    return multicrop.normalize(x)

  keys = jax.random.split(key, batch['image'].shape[0])
  return jax.vmap(one)(keys, batch['image'], batch['size'])


def train_linear_probe(config, mesh, model, params, seed: int = 0) -> dict:
  """Trains the probe; returns per-epoch validation and the best top-1.

  A signal stops it between batches (``interrupt.check``); its data workers
  are stopped either way.
  """
  readers = []
  try:
    return _train_linear_probe(config, mesh, model, params, seed, readers)
  finally:
    for reader in readers:
      reader.close()


def _train_linear_probe(config, mesh, model, params, seed, readers) -> dict:
  lc, e = config.linear, config.eval
  train_source = sources.make_source(config.data, e.train_split)
  classes = getattr(train_source, 'classes', ()) or ()
  jitted = features.jit_feature_fn(
    model,
    mesh,
    'probe',
    n_last_blocks=lc.n_last_blocks,
    avgpool=lc.avgpool,
  )
  extract = functools.partial(
    features.extract,
    functools.partial(jitted, params),
    mesh=mesh,
    batch_size=e.batch_size,
    resize_size=e.resize_size,
    crop_size=e.crop_size,
    num_workers=config.data.num_workers,
  )
  val_x, val_y = extract(
    sources.make_source(config.data, e.test_split), max_images=e.max_test_images
  )
  num_classes = len(classes) or int(val_y.max()) + 1
  n_train = (
    len(train_source)
    if lc.max_train_images < 0
    else min(lc.max_train_images, len(train_source))
  )
  steps_per_epoch = max(n_train // lc.batch_size, 1)
  lrs = epoch_lrs(lc.lr * lc.batch_size / 256, lc.epochs)
  lr_table = jnp.asarray(np.repeat(lrs, steps_per_epoch), jnp.float32)
  tx = optax.sgd(
    lambda count: lr_table[jnp.minimum(count, len(lr_table) - 1)],
    momentum=0.9,
  )
  linear = init_linear(jax.random.PRNGKey(seed), val_x.shape[1], num_classes)
  # Host values, equal on every process -> arrays on the whole mesh.
  linear, opt_state = features.replicate(
    mesh, jax.device_get((linear, tx.init(linear)))
  )

  def update(linear, opt_state, feats, labels):
    loss, grads = jax.value_and_grad(_loss)(linear, feats, labels)
    updates, opt_state = tx.update(grads, opt_state, linear)
    return optax.apply_updates(linear, updates), opt_state, loss

  reader = None
  if lc.augment:
    # Read on a thread: a signal stops the wait (interrupt.check).
    reader = interrupt.Reader(
      iter(
        pipeline.train_dataset(
          _Limit(train_source, n_train),
          batch_size=lc.batch_size,
          rows=parallel.process_rows(mesh, lc.batch_size),
          canvas_size=config.data.canvas_size,
          seed=seed,
          num_workers=config.data.num_workers,
        )
      )
    )
    readers.append(reader)

    @jax.jit
    def step(linear, opt_state, params, key, batch):
      crops = _train_crops(key, batch, e.crop_size)
      return update(linear, opt_state, jitted(params, crops), batch['label'])
  else:
    train_x, train_y = extract(train_source, max_images=n_train)
    step = jax.jit(update)

  history, key = [], jax.random.PRNGKey(seed + 1)
  rs = np.random.RandomState(seed)
  for epoch in range(lc.epochs):
    if not lc.augment:
      order = rs.permutation(len(train_y))
    for i in range(steps_per_epoch):
      interrupt.check()  # a signal stops the probe between batches
      if lc.augment:
        batch = pipeline.global_batch(mesh, reader.next())
        linear, opt_state, loss = step(
          linear,
          opt_state,
          params,
          features.replicate(
            mesh, jax.random.fold_in(key, len(history) * 100003 + i)
          ),
          batch,
        )
      else:
        idx = order[i * lc.batch_size : (i + 1) * lc.batch_size]
        linear, opt_state, loss = step(
          linear,
          opt_state,
          *features.replicate(mesh, (train_x[idx], train_y[idx])),
        )
    top1, top5 = accuracy(jax.device_get(linear), val_x, val_y)
    history.append(
      {
        'epoch': epoch + 1,
        'lr': float(lrs[epoch]),
        'loss': float(loss),
        'top1': top1,
        'top5': top5,
      }
    )
    logger.info(
      'linear epoch %d/%d  loss %.4f  val top-1 %.2f  top-5 %.2f',
      epoch + 1,
      lc.epochs,
      float(loss),
      top1,
      top5,
    )
  best = max(history, key=lambda h: h['top1'])
  return {
    'best_top1': best['top1'],
    'best_epoch': best['epoch'],
    'feature_dim': int(val_x.shape[1]),
    'history': history,
    'linear': jax.device_get(linear),
  }


class _Limit:
  """The first n records of a source."""

  def __init__(self, source, n):
    self.source, self.n = source, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return self.source[i]


def linear_from_workdir(workdir: str, overrides: list[str] = ()) -> dict:
  """Linear probe of the teacher in ``workdir``; writes eval/linear.json."""
  config, mesh, state, step = workdir_lib.load_workdir(workdir, overrides)
  _, teacher = step_lib.build_models(config)
  result = train_linear_probe(
    config, mesh, teacher.backbone, state.teacher['backbone'], seed=config.seed
  )
  linear = result.pop('linear')
  print(
    f'linear probe (step {step}): best val top-1 '
    f'{result["best_top1"]:.2f} at epoch {result["best_epoch"]}',
    flush=True,
  )
  knn.write_results(workdir, 'linear', {'step': step, **result})
  if jax.process_index() == 0:
    np.savez(
      f'{workdir}/eval/linear_weights.npz',
      **{k: np.asarray(v) for k, v in linear.items()},
    )
  return result


def define_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string(
    'workdir', None, 'Training workdir (its checkpoint).', flag_values=values
  )


def main(values: flags.FlagValues, args: list[str], overrides: list[str]):
  """``python -m dino_jax.eval.linear --workdir=DIR [--config.linear.x=y]``."""
  if args:
    raise workdir_lib.ConfigOverrideError(f'unexpected arguments: {args}')
  if not values.workdir:
    raise workdir_lib.WorkdirError('--workdir is required; pass a directory')
  linear_from_workdir(values.workdir, overrides)


if __name__ == '__main__':
  hostmem.reexec_if_needed()  # glibc malloc settings for XLA:CPU
  sys.exit(workdir_lib.run_cli(define_flags, main, errors=(DataError,)))
