"""Linear probe on frozen features (SPEC §7.2), with DINOv2's lr sweep.

CLI: ``python -m dino_jax.eval.linear --workdir=DIR`` (or
``--pretrained=X.pth --config=configs/<model>.py``; overrides such as
``--config.linear.epochs=10``). Writes WORKDIR/eval/linear.json and
eval/linear_weights.npz (local or gs://).

Features: CLS tokens of the last ``n_last_blocks`` blocks (each after the
final norm) concatenated; with ``avgpool`` (n = 1) the CLS and the mean patch
token are interleaved element-wise; without a backbone, the raw pixels. A
linear layer (weight N(0, 0.01^2), bias 0) is trained with SGD momentum 0.9,
no weight decay, lr = lr * B / 256 with a cosine schedule stepped once per
epoch to 0; cross-entropy.

``linear.sweep`` False (the official protocol): one head at ``linear.lr``,
validated on the test split after every epoch; the result is the best
epoch's top-1. True (the default, as DINOv2 evaluates): one head per lr of
``linear.sweep_lrs``, all trained in one vmapped step on the same features
and batches, on the training images less a held-out ``val_fraction`` (a
fixed seeded split); the head with the best held-out top-1 after the last
epoch is scored once on the test split (``top1``, ``top5``).
"""

import functools
import io
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dino_jax import interrupt, parallel
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib
from dino_jax.data import multicrop, pipeline, sources
from dino_jax.data.sources import DataError
from dino_jax.evaluation import common, features

logger = logging.getLogger(__name__)


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


def holdout_split(n: int, fraction: float, seed: int):
  """(train, val) sorted row indices of ``range(n)``: a fixed seeded split.

  ``round(n * fraction)`` rows (at least 1, at most n - 1) are held out.
  """
  if not 0 < fraction < 1:
    raise workdir_lib.ConfigOverrideError(
      f'linear.val_fraction={fraction} must lie strictly between 0 and 1; '
      'pass e.g. --config.linear.val_fraction=0.1'
    )
  if n < 2:
    raise DataError(
      f'{n} training images cannot be split into train and val; '
      'use at least 2 (or --config.linear.sweep=false)'
    )
  n_val = min(max(int(round(n * fraction)), 1), n - 1)
  order = np.random.RandomState(seed).permutation(n)
  return np.sort(order[n_val:]), np.sort(order[:n_val])


def sweep_scales(lc) -> np.ndarray:
  """The sweep's base learning rates, each times batch_size / 256."""
  lrs = np.asarray(lc.sweep_lrs, np.float64)
  if lrs.ndim != 1 or not len(lrs) or np.any(lrs <= 0):
    raise workdir_lib.ConfigOverrideError(
      f'linear.sweep_lrs={tuple(lc.sweep_lrs)} must be positive values; '
      'pass e.g. --config.linear.sweep_lrs="(0.001, 0.01)"'
    )
  return lrs * lc.batch_size / 256


def _sgd(lrs: np.ndarray, steps_per_epoch: int):
  """SGD momentum 0.9, the lr of each epoch held for its steps."""
  lr_table = jnp.asarray(np.repeat(lrs, steps_per_epoch), jnp.float32)
  return optax.sgd(
    lambda count: lr_table[jnp.minimum(count, len(lr_table) - 1)],
    momentum=0.9,
  )


def _update(tx, linear, opt_state, feats, labels):
  """One SGD step of one head: (linear, opt_state, loss)."""
  loss, grads = jax.value_and_grad(_loss)(linear, feats, labels)
  updates, opt_state = tx.update(grads, opt_state, linear)
  return optax.apply_updates(linear, updates), opt_state, loss


def _sweep_update(tx, scales, linear, opt_state, feats, labels):
  """One step of every head: head h's updates scaled by ``scales[h]``.

  ``tx`` runs at a unit base lr: SGD's update is -lr * momentum trace, so
  scaling it by a head's lr is that head's own SGD step.
  """

  def one(scale, linear, opt_state):
    loss, grads = jax.value_and_grad(_loss)(linear, feats, labels)
    updates, opt_state = tx.update(grads, opt_state, linear)
    updates = jax.tree.map(lambda u: scale * u, updates)
    return optax.apply_updates(linear, updates), opt_state, loss

  return jax.vmap(one)(scales, linear, opt_state)


def sweep_heads(linear, count: int):
  """``count`` copies of one head, stacked on a leading axis."""
  return jax.tree.map(lambda x: jnp.stack([x] * count), linear)


def _extractor(config, mesh, model, params):
  """(jitted probe features, ``extract(source, max_images)``)."""
  lc, e = config.linear, config.eval
  kind = 'pixels' if model is None else 'probe'
  options = (
    {}
    if model is None
    else {'n_last_blocks': lc.n_last_blocks, 'avgpool': lc.avgpool}
  )
  jitted = features.jit_feature_fn(model, mesh, kind, **options)
  extract = functools.partial(
    features.extract,
    functools.partial(jitted, params),
    mesh=mesh,
    batch_size=e.batch_size,
    resize_size=e.resize_size,
    crop_size=e.crop_size,
    num_workers=config.data.num_workers,
  )
  return jitted, extract


def _num_train(lc, source) -> int:
  if lc.max_train_images < 0:
    return len(source)
  return min(lc.max_train_images, len(source))


def _make_step(update, jitted, crop_size: int, augment: bool):
  """The jitted step: (linear, opt_state, *batch_args) -> (.., .., loss)."""
  if not augment:
    return jax.jit(update)

  @jax.jit
  def step(linear, opt_state, params, key, batch):
    crops = _train_crops(key, batch, crop_size)
    return update(linear, opt_state, jitted(params, crops), batch['label'])

  return step


def _epoch_batches(config, mesh, params, source, seed, readers, extract):
  """(steps per epoch, ``batches(epoch)``: the step arguments of an epoch).

  With ``linear.augment`` a reader of random crops (closed by the caller
  through ``readers``); else the features of ``source``, extracted once
  and shuffled each epoch.
  """
  lc = config.linear
  steps = max(len(source) // lc.batch_size, 1)
  if lc.augment:
    # Read on a thread: a signal stops the wait (interrupt.check).
    reader = interrupt.Reader(
      iter(
        pipeline.train_dataset(
          source,
          batch_size=lc.batch_size,
          rows=parallel.process_rows(mesh, lc.batch_size),
          canvas_size=config.data.canvas_size,
          seed=seed,
          num_workers=config.data.num_workers,
        )
      )
    )
    readers.append(reader)
    key = jax.random.PRNGKey(seed + 1)

    def batches(epoch):
      for i in range(steps):
        batch = pipeline.global_batch(mesh, reader.next())
        step_key = jax.random.fold_in(key, epoch * 100003 + i)
        yield params, features.replicate(mesh, step_key), batch

    return steps, batches
  train_x, train_y = extract(source)
  rs = np.random.RandomState(seed)

  def batches(epoch):
    del epoch
    order = rs.permutation(len(train_y))
    for i in range(steps):
      idx = order[i * lc.batch_size : (i + 1) * lc.batch_size]
      yield features.replicate(mesh, (train_x[idx], train_y[idx]))

  return steps, batches


def _run_epoch(step, linear, opt_state, batches):
  loss = None
  for args in batches:
    interrupt.check()  # a signal stops the probe between batches
    linear, opt_state, loss = step(linear, opt_state, *args)
  return linear, opt_state, loss


def train_linear_probe(config, mesh, model, params, seed: int = 0) -> dict:
  """Trains the probe (``linear.sweep``: one head per lr); returns results.

  ``model`` None: a probe on raw pixels (``params`` ignored). A signal
  stops it between batches (``interrupt.check``); its data workers are
  stopped either way.
  """
  readers = []
  try:
    if config.linear.get('sweep', False):
      return _train_sweep(config, mesh, model, params, seed, readers)
    return _train_linear_probe(config, mesh, model, params, seed, readers)
  finally:
    for reader in readers:
      reader.close()


def _train_linear_probe(config, mesh, model, params, seed, readers) -> dict:
  """The official protocol: one lr, the best epoch on the test split."""
  lc, e = config.linear, config.eval
  train_source = sources.make_source(config.data, e.train_split)
  classes = getattr(train_source, 'classes', ()) or ()
  jitted, extract = _extractor(config, mesh, model, params)
  val_x, val_y = extract(
    sources.make_source(config.data, e.test_split), max_images=e.max_test_images
  )
  num_classes = len(classes) or int(val_y.max()) + 1
  train = _Subset(train_source, range(_num_train(lc, train_source)))
  steps, batches = _epoch_batches(
    config, mesh, params, train, seed, readers, extract
  )
  lrs = epoch_lrs(lc.lr * lc.batch_size / 256, lc.epochs)
  tx = _sgd(lrs, steps)
  linear = init_linear(jax.random.PRNGKey(seed), val_x.shape[1], num_classes)
  # Host values, equal on every process -> arrays on the whole mesh.
  linear, opt_state = features.replicate(
    mesh, jax.device_get((linear, tx.init(linear)))
  )
  step = _make_step(
    functools.partial(_update, tx), jitted, e.crop_size, lc.augment
  )
  history = []
  for epoch in range(lc.epochs):
    linear, opt_state, loss = _run_epoch(
      step, linear, opt_state, batches(epoch)
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


def _head(linear, h: int):
  return jax.tree.map(lambda x: np.asarray(x[h]), linear)


def _train_sweep(config, mesh, model, params, seed, readers) -> dict:
  """DINOv2's protocol: one head per lr, chosen on held-out train images."""
  lc, e = config.linear, config.eval
  scales = sweep_scales(lc)
  train_source = sources.make_source(config.data, e.train_split)
  classes = getattr(train_source, 'classes', ()) or ()
  train_rows, val_rows = holdout_split(
    _num_train(lc, train_source), lc.val_fraction, lc.split_seed
  )
  jitted, extract = _extractor(config, mesh, model, params)
  test_x, test_y = extract(
    sources.make_source(config.data, e.test_split), max_images=e.max_test_images
  )
  val_x, val_y = extract(_Subset(train_source, val_rows))
  num_classes = len(classes) or int(max(test_y.max(), val_y.max())) + 1
  steps, batches = _epoch_batches(
    config,
    mesh,
    params,
    _Subset(train_source, train_rows),
    seed,
    readers,
    extract,
  )
  lrs = epoch_lrs(1.0, lc.epochs)  # times each head's lr
  tx = _sgd(lrs, steps)
  linear = init_linear(jax.random.PRNGKey(seed), val_x.shape[1], num_classes)
  linear = sweep_heads(linear, len(scales))
  opt_state = jax.vmap(tx.init)(linear)
  linear, opt_state, scales_dev = features.replicate(
    mesh, jax.device_get((linear, opt_state, scales.astype(np.float32)))
  )
  update = functools.partial(_sweep_update, tx, scales_dev)
  step = _make_step(update, jitted, e.crop_size, lc.augment)
  history = []
  for epoch in range(lc.epochs):
    linear, opt_state, loss = _run_epoch(
      step, linear, opt_state, batches(epoch)
    )
    host = jax.device_get(linear)
    val = [accuracy(_head(host, h), val_x, val_y) for h in range(len(scales))]
    history.append(
      {
        'epoch': epoch + 1,
        'loss': [float(x) for x in np.asarray(loss)],
        'val_top1': [v[0] for v in val],
      }
    )
    if (epoch + 1) % 10 == 0 or epoch + 1 == lc.epochs:  # the demo: 3 x 10
      logger.info(
        'linear sweep epoch %d/%d  best val top-1 %.2f',
        epoch + 1,
        lc.epochs,
        max(v[0] for v in val),
      )
  chosen = int(np.argmax(history[-1]['val_top1']))  # the first of ties
  best = _head(jax.device_get(linear), chosen)
  top1, top5 = accuracy(best, test_x, test_y)
  return {
    'sweep': True,
    'lrs': [float(x) for x in lc.sweep_lrs],
    'scaled_lrs': [float(x) for x in scales],
    'val_top1': history[-1]['val_top1'],
    'chosen_lr': float(lc.sweep_lrs[chosen]),
    'chosen_scaled_lr': float(scales[chosen]),
    'chosen_index': chosen,
    'top1': top1,
    'top5': top5,
    'best_top1': top1,  # the test top-1 of the chosen head
    'feature_dim': int(val_x.shape[1]),
    'train_images': int(len(train_rows)),
    'val_images': int(len(val_rows)),
    'history': history,
    'linear': best,
  }


class _Subset:
  """The records ``rows`` of a source, in that order."""

  def __init__(self, source, rows):
    self.source, self.rows = source, np.asarray(rows, np.int64)

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    return self.source[int(self.rows[i])]


def linear_sweep_eval(config, mesh, backbone, params, seed=None) -> dict:
  """The lr-sweep probe (``linear.sweep`` forced on) of ``backbone``.

  ``backbone`` None: raw pixels. Returns the result without the weights.
  """
  config = config.copy_and_resolve_references()
  config.linear.sweep = True
  seed = config.seed if seed is None else seed
  result = train_linear_probe(config, mesh, backbone, params, seed=seed)
  result.pop('linear')
  return result


def weights_bytes(linear) -> bytes:
  """The head's kernel and bias as an .npz file's bytes."""
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(v) for k, v in linear.items()})
  return buffer.getvalue()


def linear_from_workdir(workdir: str, overrides: list[str] = ()) -> dict:
  """Linear probe of the teacher in ``workdir``; writes eval/linear.json."""
  config, mesh, state, step = workdir_lib.load_workdir(workdir, overrides)
  _, teacher = step_lib.build_models(config)
  result = train_linear_probe(
    config,
    mesh,
    teacher.backbone,
    step_lib.teacher_backbone(state),
    seed=config.seed,
  )
  write_results(workdir, step, result, config)
  return result


def write_results(
  workdir: str, step: int, result: dict, config=None
) -> tuple[str, str]:
  """Writes eval/linear.json and eval/linear_weights.npz (local or gs://).

  Pops ``result['linear']`` (the weights); prints the summary and where
  both files went; returns their paths. A record of the run (with the
  ``linear.*`` and ``data`` settings of ``config``) goes to eval/records/.
  """
  linear = result.pop('linear')
  settings = None
  if config is not None:
    d = config.data
    settings = {
      'data': {'source': d.source, 'name': d.name, 'path': d.path},
      'linear': config.linear.to_dict(),
    }
  path = common.write_record(
    workdir, 'linear', {'step': step, **result}, settings=settings
  )
  weights = common.write_bytes(
    workdir, 'linear_weights.npz', weights_bytes(linear)
  )
  if result.get('sweep'):
    summary = (
      f'test top-1 {result["top1"]:.2f} top-5 {result["top5"]:.2f} at lr '
      f'{result["chosen_lr"]:g} (best val top-1 of '
      f'{len(result["lrs"])} lrs)'
    )
  else:
    summary = (
      f'best val top-1 {result["best_top1"]:.2f} at epoch '
      f'{result["best_epoch"]}'
    )
  print(
    f'linear probe (step {step}): {summary}; wrote {path} and {weights}',
    flush=True,
  )
  return path, weights
