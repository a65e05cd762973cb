"""The DINO optimizer as an optax chain (SPEC §4.1, §4.3, §4.4).

per-tensor clip -> {last layer: frozen for ``freeze_steps`` updates, rest} x
(AdamW moments + decoupled weight decay on weights only) -> -lr. Learning rate
and weight decay come from per-iteration schedules injected by
``optax.inject_hyperparams``, whose counter is the global step. The official
ResNet runs use SGD or LARS (momentum 0.9) in place of AdamW
(SPEC-downstream §5).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dino_jax import parallel

OPTIMIZERS = ('adamw', 'sgd', 'lars')
LARS_ETA = 0.001  # official utils.py LARS eta (trust coefficient)


def per_layer(fn: Callable, path: tuple) -> Callable:
  """``fn`` of one tensor, mapped over the layers of a stacked leaf.

  A scanned ViT (model.scan_blocks) holds each block tensor of every layer
  in one leaf (``parallel.is_stacked``): what the official code computes per
  tensor (a norm, a clip) is computed per layer, as for the unrolled blocks.
  """
  return jax.vmap(fn) if parallel.is_stacked(path) else fn


def clip_by_tensor_norm(max_norm: float) -> optax.GradientTransformation:
  """Scale each tensor to norm <= max_norm, separately (SPEC §4.3).

  coef = max_norm / (||g|| + 1e-6); g <- g * coef when coef < 1. Unlike
  ``optax.clip_by_global_norm``, tensors do not affect each other (nor do the
  layers of a stacked leaf: ``per_layer``).
  """

  def update_fn(updates, state, params=None):
    del params

    def clip(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      coef = max_norm / (norm + 1e-6)
      return jnp.where(coef < 1.0, g * coef.astype(g.dtype), g)

    return jax.tree_util.tree_map_with_path(
      lambda path, g: per_layer(clip, path)(g), updates
    ), state

  return optax.GradientTransformation(
    lambda params: optax.EmptyState(), update_fn
  )


def _key(entry) -> str:
  return str(getattr(entry, 'key', getattr(entry, 'name', entry)))


def decay_mask(params):
  """True where weight decay applies: not biases, not 1-D tensors (SPEC §4.1).

  So cls_token, pos_embed, every kernel, weight_v and a trainable weight_g
  ([1, K], 2-D as torch's [K, 1]) are decayed; biases and norm scales not.
  A stacked leaf's (``parallel.is_stacked``) layers axis does not count.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, p: (
      _key(path[-1]) != 'bias' and p.ndim - parallel.is_stacked(path) > 1
    ),
    params,
  )


def scale_by_trust_ratio(
  trust_coefficient: float,
) -> optax.GradientTransformation:
  """``optax.scale_by_trust_ratio`` per tensor, per layer of a stacked leaf.

  u <- u * eta ||p|| / ||u|| (1 where a norm is 0), as the official LARS.
  """
  inner = optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient)

  def one(u, p):  # one tensor: optax's own update of a single leaf
    return inner.update(u, inner.init(p), p)[0]

  def update_fn(updates, state, params):
    return jax.tree_util.tree_map_with_path(
      lambda path, u, p: per_layer(one, path)(u, p), updates, params
    ), state

  return optax.GradientTransformation(
    lambda params: optax.EmptyState(), update_fn
  )


def last_layer_labels(params):
  """'last_layer' for the head's weight-normalized layer, 'rest' otherwise."""
  return jax.tree_util.tree_map_with_path(
    lambda path, p: (
      'last_layer' if any(_key(e) == 'last_layer' for e in path) else 'rest'
    ),
    params,
  )


def _dino_optimizer(
  learning_rate: float,
  weight_decay: float,
  *,
  name: str,
  clip_grad: float,
  freeze_steps: int,
) -> optax.GradientTransformation:
  def branch():
    if name == 'adamw':
      # torch AdamW defaults, decoupled decay: -lr (m/(sqrt(v)+eps) + wd p)
      return optax.chain(
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
      )
    if name == 'sgd':
      # torch SGD(momentum=0.9): coupled decay added to the gradient.
      return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.trace(decay=0.9),
      )
    if name == 'lars':
      # Official utils.py LARS: dp = g + wd p; dp *= eta ||p|| / ||dp|| (1
      # where a norm is 0); mu = 0.9 mu + dp; p -= lr mu. Biases and 1-D
      # tensors are neither decayed nor adapted. Not optax.lars, which
      # scales by lr before the momentum (differs while lr changes).
      return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.masked(
          scale_by_trust_ratio(trust_coefficient=LARS_ETA), decay_mask
        ),
        optax.trace(decay=0.9),
      )
    raise ValueError(f'optimizer {name!r} unknown; use one of {OPTIMIZERS}')

  last = branch()
  if freeze_steps > 0:
    # SPEC §4.4: while frozen, no update, no decay, and moments and count
    # held, so the last layer gets its own bias correction when it unfreezes.
    last = optax.transforms.conditionally_mask(
      last, lambda count: count >= freeze_steps
    )
  return optax.chain(
    clip_by_tensor_norm(clip_grad) if clip_grad > 0 else optax.identity(),
    optax.multi_transform(
      {'last_layer': last, 'rest': branch()}, last_layer_labels
    ),
    optax.scale_by_learning_rate(learning_rate),
  )


def _indexer(values: np.ndarray) -> Callable[[jax.Array], jax.Array]:
  table = jnp.asarray(values, jnp.float32)

  def lookup(count):
    return table[jnp.minimum(count, len(values) - 1)]

  return lookup


def make_optimizer(
  name: str,
  lr_schedule: np.ndarray,
  wd_schedule: np.ndarray,
  *,
  clip_grad: float,
  freeze_steps: int,
) -> optax.GradientTransformation:
  """The DINO optimizer.

  Args:
    name: 'adamw' (official default), 'sgd' or 'lars' (both momentum 0.9).
    lr_schedule: per-iteration learning rate (``schedules.cosine_schedule``).
    wd_schedule: per-iteration weight decay.
    clip_grad: per-tensor max gradient norm; 0 disables.
    freeze_steps: updates during which the last layer is frozen
      (freeze_last_layer * steps_per_epoch).

  Returns:
    An optax transformation; ``opt_state.hyperparams`` holds lr and wd.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f'optimizer {name!r} unknown; use one of {OPTIMIZERS}')

  def factory(learning_rate, weight_decay):
    return _dino_optimizer(
      learning_rate,
      weight_decay,
      name=name,
      clip_grad=float(clip_grad),
      freeze_steps=int(freeze_steps),
    )

  return optax.inject_hyperparams(factory)(
    learning_rate=_indexer(lr_schedule),
    weight_decay=_indexer(wd_schedule),
  )


def set_schedule_step(opt_state, step: int):
  """Puts the schedule and freeze counters of a fresh state at ``step``.

  For a state seeded mid-run (e.g. imported from PyTorch): lr and weight
  decay continue from ``step`` and the last-layer freeze is judged from it,
  while fresh Adam moments keep their own bias-correction count.
  """
  step = jnp.asarray(step, jnp.int32)
  opt_state = opt_state._replace(count=step)  # InjectHyperparamsState
  try:
    return optax.tree.set(opt_state, step=step)  # ConditionallyMaskState
  except KeyError:  # no frozen last layer in this optimizer
    return opt_state
