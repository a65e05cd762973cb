"""Lockstep of dino_jax's train step with the official training (issue 45).

One process holds both sides, started from the same weights and fed the
same crops at every step:

- official: ``VisionTransformer``, ``DINOHead``, ``MultiCropWrapper``,
  ``DINOLoss``, ``get_params_groups`` + AdamW and the ``cosine_scheduler``
  arrays, built as ``main_dino.train_dino`` builds them (with the config's
  dims, ``benchmarks/convergence.build_official``), and trained by
  ``main_dino.train_one_epoch`` itself (per-tensor ``clip_gradients``,
  ``cancel_gradients_last_layer``, the EMA), all loaded by path from
  ``--official_repo``; CPU torch, float32.
- dino_jax: its own train step (``step.make_train_step`` with the models,
  schedules and optimizer of ``step.build_models`` / ``Schedules`` /
  ``build_optimizer``, jitted by ``parallel.jit_train_step`` as the trainer
  does), started from the official initial weights (moved with
  ``interop.from_pytorch``), fed the official crops (``DataAugmentationDINO``
  as ``convergence.MultiCropTransform`` writes it, NCHW -> NHWC) with the
  on-device augmentation bypassed (``augment=None``). One pass-through
  transformation in front of its optimizer keeps a copy of the clipped
  gradients for the comparison; it changes no update. A ViT with scanned
  blocks (``--config.model.scan_blocks=true``, optionally with
  ``model.remat``) starts from the official weights stacked on its layers
  axis (``from_pytorch``); its stacked parameters, gradients and Adam
  moments are split per block (``vit.unstack_blocks``) and compared with
  the official ``blocks.{i}.*`` tensors.

After each step it compares, as ||a - b|| / ||b|| (b the official value):
the loss, the teacher entropy, the center, the learning rate, weight decay
and teacher momentum used, the norm of the clipped gradients per parameter
group (regularized, not regularized; the last layer left out while the
official code drops its gradient), and every tensor of the student, the
teacher, the clipped gradients and the two Adam moments (per quantity, the
largest over tensors). The key part of each ``attn.qkv.bias`` is
reported apart and not checked (``UNTRACKED``: its gradient is rounding
noise that no output depends on), and so is each head bias that a
BatchNorm follows (``use_bn_in_head``). One JSON line per step goes to
``--out``; the last stdout line is

  {"steps": N, "max_rel": {quantity: largest over steps},
   "first_over": null or {"step": s, "quantity": q, "rel": r}, ...}

with ``first_over`` the first step (and in it, the first quantity in
``quantities(config)``' order) whose difference exceeds ``--tol``. Steps
count from 0. ``--summarize`` prints the table of an ``--out`` file
(docs/parity.md):

  python benchmarks/lockstep.py --official_repo ../shared/official-dino \\
      --steps 360 --threads 1 --out /tmp/lockstep.jsonl
  python benchmarks/lockstep.py --summarize /tmp/lockstep.jsonl \\
      --at 1,10,50,100,200,360
  python benchmarks/lockstep.py --official_repo ../shared/official-dino \\
      --steps 50 --config.model.attention=fused

The recipe (default ``configs/fashion_mnist.py:parity``) takes
``--config.a.b=c`` overrides as the trainer does. Stochastic depth must be
off (``model.drop_path_rate=0``): the two sides would draw different masks.

A ResNet (``--config.model.arch=resnet18``, narrowed by
``model.resnet_width``) has as its official counterpart the torch ResNet of
tests/torch_resnet.py (torchvision's public definition, which
``main_dino`` builds; torchvision is not loadable here) inside the official
``MultiCropWrapper`` + ``DINOHead``, BatchNorm in train mode on both sides.
``main_dino`` converts it to ``SyncBatchNorm`` and wraps the teacher in DDP;
with one process both equal plain BatchNorm (and torch's SyncBatchNorm
refuses CPU tensors), so neither is applied. The running statistics of
student and teacher are compared too (``*_batch_stats``). ``optim.name``
picks the official optimizer: AdamW, ``torch.optim.SGD(momentum=0.9)`` or
``utils.LARS``, each on ``get_params_groups``; for the last two the
momentum buffers are compared in place of the Adam moments:

  python benchmarks/lockstep.py --official_repo ../shared/official-dino \\
      --steps 20 --config=tests/tiny_config.py \\
      --config.model.arch=resnet18 --config.model.resnet_width=8 \\
      --config.optim.name=sgd
"""

import argparse
import contextlib
import json
import math
import os
import random
import re
import sys
import time
from typing import Any, NamedTuple

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (
  REPO,
  os.path.join(REPO, 'benchmarks'),
  os.path.join(REPO, 'tests'),
):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import convergence  # noqa: E402

# Compared quantities, in the order ``first_over`` checks them within a step.
SCALARS = ('loss', 'teacher_entropy', 'lr', 'wd', 'momentum')
GROUPS = ('regularized', 'not_regularized')  # get_params_groups' two groups
TENSORS = ('grad', 'adam_mu', 'adam_nu', 'student', 'teacher')
QUANTITIES = (
  SCALARS + ('center',) + tuple(f'grad_norm_{g}' for g in GROUPS) + TENSORS
)
# Reported, never checked against --tol: the key part of each qkv bias. It
# adds the same q . b_k to every logit of a query, so the softmax cancels it
# and its gradient is 0 up to rounding (~1e-10). Adam divides that rounding
# noise by sqrt(v) + eps and steps on it, so both sides move these entries
# by noise that differs between them, in a direction that changes no output.
# 'student' and 'teacher' hold the rest of qkv.bias (its q and v parts).
UNTRACKED = (
  'student_key_bias',
  'teacher_key_bias',
  # Likewise, with use_bn_in_head, the bias of each head Linear that a
  # BatchNorm follows: the BatchNorm subtracts the batch mean, bias
  # included. These are left out of every checked tensor quantity.
  'student_bn_bias',
  'teacher_bn_bias',
)
# The optimizer state compared per optim.name: (quantity, official state
# key, optax state class name, its field).
OPT_STATE = {
  'adamw': (
    ('adam_mu', 'exp_avg', 'ScaleByAdamState', 'mu'),
    ('adam_nu', 'exp_avg_sq', 'ScaleByAdamState', 'nu'),
  ),
  'sgd': (('momentum_buffer', 'momentum_buffer', 'TraceState', 'trace'),),
  'lars': (('momentum_buffer', 'mu', 'TraceState', 'trace'),),
}
# BatchNorm running statistics (mean and variance), where the model has any.
BATCH_STATS = ('student_batch_stats', 'teacher_batch_stats')
RESNETS = ('resnet18', 'resnet34', 'resnet50')  # tests/torch_resnet.py's
DEFAULT_CONFIG = os.path.join(REPO, 'configs', 'fashion_mnist.py') + ':parity'


class LockstepError(ValueError):
  """A recipe the lockstep cannot run; the message names the value."""


def has_batchnorm(config) -> bool:
  return config.model.arch.startswith('resnet') or config.model.use_bn_in_head


def quantities(config) -> tuple[str, ...]:
  """The checked quantities of a recipe, in ``first_over``'s order
  (``QUANTITIES`` for a ViT trained with AdamW)."""
  opt = tuple(q for q, *_ in OPT_STATE[config.optim.name])
  return (
    SCALARS
    + ('center',)
    + tuple(f'grad_norm_{g}' for g in GROUPS)
    + ('grad',)
    + opt
    + ('student', 'teacher')
    + (BATCH_STATS if has_batchnorm(config) else ())
  )


def relative(a, b) -> float:
  """||a - b|| / ||b|| in float64; 0 where both are 0, inf where b alone is."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  diff = float(np.linalg.norm((a - b).ravel()))
  norm = float(np.linalg.norm(b.ravel()))
  if norm == 0.0:
    return 0.0 if diff == 0.0 else math.inf
  return diff / norm


# ---------------------------------------------------------------------------
# The dino_jax side.


class ClippedGrads(NamedTuple):
  """State of ``keep_clipped_grads``: the last step's clipped gradients."""

  grads: Any


def keep_clipped_grads(clip_grad: float):
  """A pass-through optax transformation that stores the clipped gradients.

  Chained in front of dino_jax's optimizer it changes nothing; its state
  holds the gradients after dino_jax's own per-tensor clipping
  (``optim.clip_by_tensor_norm``), for comparison with the official
  ``p.grad`` after ``clip_gradients``.
  """
  import jax
  import jax.numpy as jnp
  import optax

  from dino_jax import optim

  clip = (
    optim.clip_by_tensor_norm(clip_grad) if clip_grad > 0 else optax.identity()
  )

  def init(params):
    return ClippedGrads(jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del state
    clipped, _ = clip.update(updates, clip.init(params), params)
    return updates, ClippedGrads(clipped)

  return optax.GradientTransformation(init, update)


class JaxSide:
  """dino_jax's jitted train step on ready crops, from given weights."""

  def __init__(self, config, steps_per_epoch: int, official_student, devices):
    import jax
    import jax.numpy as jnp
    import optax

    from dino_jax import interop, parallel
    from dino_jax import step as step_lib

    self.config = config
    sched = step_lib.Schedules.from_config(config, steps_per_epoch)
    self.student, teacher = step_lib.build_models(config, 'cpu')
    tx = optax.chain(
      keep_clipped_grads(config.optim.clip_grad),
      step_lib.build_optimizer(config, sched),
    )
    train_step = step_lib.make_train_step(
      self.student,
      teacher,
      tx,
      sched,
      student_temp=config.loss.student_temp,
      center_momentum=config.loss.center_momentum,
      augment=None,
    )
    # Copies: jnp.asarray may alias a numpy view of a torch tensor, which
    # the official step then changes in place (BatchNorm's running
    # statistics, and the weights where the first lr is not 0) before this
    # side's first step reads it.
    weights = {
      k: v.detach().numpy().copy()
      for k, v in official_student.module.state_dict().items()
    }
    variables = {
      part: interop.from_pytorch(weights, getattr(self.student, part))
      for part in ('backbone', 'head')
    }
    params = {part: v['params'] for part, v in variables.items()}
    # BatchNorm running statistics; the teacher loads the student's buffers.
    stats = {
      part: v['batch_stats']
      for part, v in variables.items()
      if v.get('batch_stats')
    }
    state = step_lib.TrainState(
      step=jnp.zeros((), jnp.int32),
      rng=jax.random.PRNGKey(config.seed),
      student=params,
      # main_dino: the teacher loads the student's state dict.
      teacher=jax.tree.map(jnp.copy, params),
      center=jnp.zeros((1, config.model.out_dim), jnp.float32),
      opt_state=tx.init(params),
      batch_stats=(
        {'student': stats, 'teacher': jax.tree.map(jnp.copy, stats)}
        if stats
        else None
      ),
    )
    mesh = parallel.make_mesh(
      config.mesh.data, config.mesh.fsdp, devices=devices
    )
    shardings = parallel.state_sharding(
      mesh, jax.eval_shape(lambda: state), config.mesh.fsdp_min_size
    )
    self.state = jax.device_put(state, shardings)
    c = config.crops
    b = config.batch_size
    batch_shape = {
      'global_crops': jax.ShapeDtypeStruct(
        (2, b, c.global_size, c.global_size, 3), np.float32
      ),
    }
    if c.local_number:
      batch_shape['local_crops'] = jax.ShapeDtypeStruct(
        (c.local_number, b, c.local_size, c.local_size, 3), np.float32
      )
    self.jitted = parallel.jit_train_step(
      train_step, mesh, shardings, batch_shape
    )
    self.metrics = None

  def step(self, images: list) -> None:
    """One step on the official crops (a list of [B, 3, H, W] tensors)."""
    nhwc = [im.permute(0, 2, 3, 1).numpy() for im in images]
    batch = {'global_crops': np.stack(nhwc[:2])}
    if len(nhwc) > 2:
      batch['local_crops'] = np.stack(nhwc[2:])
    self.state, self.metrics = self.jitted(self.state, batch)

  def named(self, tree, collection='params') -> dict[str, np.ndarray]:
    """A student-shaped tree as official names (``backbone.*``, ``head.*``)
    in the official layout, as ``interop.to_pytorch`` names them
    (``collection='batch_stats'``: the ``running_*`` buffers).

    ``to_pytorch`` traces the module for its names at each call (about a
    second for this per step and tree); its rules are looked up once here.
    A ViT with scanned blocks (``model.scan_blocks``: each block tensor
    stacked on a leading layers axis) is split per block first
    (``vit.unstack_blocks``) and named by the rules of its unrolled clone,
    as ``to_pytorch`` does: ``blocks.{i}.*`` as the official code names
    them.
    """
    import flax

    from dino_jax import interop
    from dino_jax.models import vit as vit_lib

    if not hasattr(self, '_rules'):
      self._rules, self._scanned = {}, set()
      for part in ('backbone', 'head'):
        module = getattr(self.student, part)
        if getattr(module, 'scan_blocks', False):
          module = module.clone(scan_blocks=False)
          self._scanned.add(part)
        self._rules[part] = interop._abstract_variables(module)[1]
    out = {}
    for part, rules in self._rules.items():
      if part not in tree:  # batch_stats: a head without BatchNorm
        continue
      subtree = tree[part]
      if part in self._scanned:  # blocks -> blocks_{i}
        subtree = vit_lib.unstack_blocks(subtree)
      flat = flax.traverse_util.flatten_dict(subtree, sep='/')
      for path, value in flat.items():
        key, transform = interop._torch_key(path, rules, collection)
        value = np.asarray(value, np.float32)
        out[f'{part}.{key}'] = transform(value) if transform else value
    if collection == 'batch_stats':
      return out
    if 'head.last_layer.weight_g' not in out:  # norm_last_layer: fixed at 1
      k = out['head.last_layer.weight_v'].shape[0]
      out['head.last_layer.weight_g'] = np.ones((k, 1), np.float32)
    return out

  def optimizer_state(self) -> dict[str, dict]:
    """The optimizer's per-parameter state (Adam's mu and nu, or the
    momentum buffer of SGD and LARS) over every parameter, merged from the
    optimizer's partitions (last layer, rest), as official-name arrays."""
    import flax
    import jax
    import optax

    out = {}
    for quantity, _, class_name, field in OPT_STATE[self.config.optim.name]:
      cls = getattr(optax, class_name)

      def is_state(x, cls=cls):
        return isinstance(x, cls)

      values = {}
      for leaf in jax.tree.leaves(self.state.opt_state, is_leaf=is_state):
        if not is_state(leaf):
          continue
        # A partition's other parameters are MaskedNodes: no leaves.
        flat, _ = jax.tree_util.tree_flatten_with_path(getattr(leaf, field))
        for path, value in flat:
          values[tuple(str(k.key) for k in path)] = value
      if not values:
        raise LockstepError(
          f'no {class_name} in the optimizer state of '
          f'optim.name={self.config.optim.name!r}'
        )
      out[quantity] = self.named(
        flax.traverse_util.unflatten_dict(jax.device_get(values))
      )
    return out

  def snapshot(self) -> dict:
    """What the comparison reads, after a step, as numpy."""
    import jax

    state = jax.device_get(self.state)
    metrics = jax.device_get(self.metrics)
    out = {
      'scalars': {name: float(metrics[name]) for name in SCALARS},
      'center': np.asarray(state.center),
      'grad': self.named(state.opt_state[0].grads),
      **self.optimizer_state(),
      'student': self.named(state.student),
      'teacher': self.named(state.teacher),
    }
    if state.batch_stats is not None:
      for name in ('student', 'teacher'):
        out[f'{name}_batch_stats'] = self.named(
          state.batch_stats[name], 'batch_stats'
        )
    return out


# ---------------------------------------------------------------------------
# The official side.


class OfficialProbe:
  """Reads what ``train_one_epoch`` computed, after each of its steps.

  The teacher's output and the center it was centered with are caught by
  forward hooks; everything else is read from the objects after the step.
  """

  def __init__(self, objects, schedules, optim_name='adamw'):
    self.opt_state = OPT_STATE[optim_name]
    self.student = objects['student'].module
    self.teacher = objects['teacher']
    self.dino_loss = objects['dino_loss']
    self.optimizer = objects['optimizer']
    self.momentum = schedules['momentum_schedule']
    self.names = {id(p): n for n, p in self.student.named_parameters()}
    self.groups = {
      group: {self.names[id(p)] for p in g['params']}
      for group, g in zip(GROUPS, self.optimizer.param_groups, strict=True)
    }
    self.teacher_output = self.center = None
    self.teacher.register_forward_hook(self._keep_teacher_output)
    self.dino_loss.register_forward_pre_hook(self._keep_center)

  def _keep_teacher_output(self, module, inputs, output):
    del module, inputs
    self.teacher_output = output.detach().clone()

  def _keep_center(self, module, inputs):
    del inputs
    self.center = module.center.detach().clone()

  def teacher_entropy(self, epoch: int) -> float:
    """Mean entropy of the centered, sharpened teacher distribution."""
    temp = float(self.dino_loss.teacher_temp_schedule[epoch])
    logits = (self.teacher_output - self.center) / temp
    log_p = torch.log_softmax(logits, dim=-1)
    return float(-(log_p.exp() * log_p).sum(-1).mean())

  def snapshot(self, step: int, epoch: int, loss: float) -> dict:
    group0 = self.optimizer.param_groups[0]
    grads = {}
    opt = {quantity: {} for quantity, *_ in self.opt_state}
    for name, p in self.student.named_parameters():
      if not p.requires_grad:
        continue
      if p.grad is not None:  # None: the frozen last layer's, dropped
        grads[name] = p.grad.detach().numpy().copy()
      # No state yet (the frozen last layer's): zeros, as optax holds it.
      state = self.optimizer.state.get(p, {})
      for quantity, key, *_ in self.opt_state:
        value = state.get(key)
        opt[quantity][name] = (
          np.zeros(p.shape, np.float32)
          if value is None
          else value.detach().numpy().copy()
        )

    def split(module):
      """(parameters, BatchNorm running statistics) of the state dict;
      ``num_batches_tracked`` left out (a momentum BatchNorm ignores it)."""
      params, stats = {}, {}
      for k, v in module.state_dict().items():
        if k.endswith('num_batches_tracked'):
          continue
        into = stats if k.endswith(('running_mean', 'running_var')) else params
        into[k] = v.detach().numpy().copy()
      return params, stats

    student, student_stats = split(self.student)
    teacher, teacher_stats = split(self.teacher)
    out = {
      'scalars': {
        'loss': loss,
        'teacher_entropy': self.teacher_entropy(epoch),
        'lr': float(group0['lr']),
        'wd': float(group0['weight_decay']),
        'momentum': float(self.momentum[step]),
      },
      'center': self.dino_loss.center.detach().numpy().copy(),
      'grad': grads,
      **opt,
      'student': student,
      'teacher': teacher,
    }
    if student_stats:
      out['student_batch_stats'] = student_stats
      out['teacher_batch_stats'] = teacher_stats
    return out


def group_norm(grads: dict, names) -> float:
  return math.sqrt(
    sum(float(np.sum(np.square(grads[n], dtype=np.float64))) for n in names)
  )


def split_key_bias(named: dict) -> tuple[dict, dict]:
  """(tensors with the key part cut out of each ``attn.qkv.bias``, the key
  parts). qkv rows are q, k, v (SPEC §2.2)."""
  rest, keys = dict(named), {}
  for name, value in named.items():
    if name.endswith('attn.qkv.bias'):
      d = value.shape[0] // 3
      rest[name] = np.concatenate([value[:d], value[2 * d :]])
      keys[name] = value[d : 2 * d]
  return rest, keys


def bn_cancelled_biases(official: dict) -> set:
  """Names of the head biases a train-mode BatchNorm cancels (each
  ``mlp.i.bias`` with a BatchNorm at ``mlp.i+1``; ``use_bn_in_head``)."""
  stats = official.get('student_batch_stats', {})
  out = set()
  for name in official['student']:
    match = re.fullmatch(r'(.*\.mlp\.)(\d+)\.bias', name)
    if match and f'{match[1]}{int(match[2]) + 1}.running_mean' in stats:
      out.add(name)
  return out


def compare(
  official: dict, jax_side: dict, groups: dict, checked=QUANTITIES
) -> tuple:
  """(rel per quantity, worst tensor per tensor quantity), for the
  ``checked`` quantities (``quantities(config)``) and ``UNTRACKED``."""
  rel, worst = {}, {}
  for name in SCALARS:
    rel[name] = relative(jax_side['scalars'][name], official['scalars'][name])
  rel['center'] = relative(jax_side['center'], official['center'])
  # Only the tensors the official code kept a gradient for.
  for group, names in groups.items():
    names = [n for n in names if n in official['grad']]
    rel[f'grad_norm_{group}'] = relative(
      group_norm(jax_side['grad'], names), group_norm(official['grad'], names)
    )
  cancelled = bn_cancelled_biases(official)
  for part in ('student', 'teacher'):
    b = split_key_bias(official[part])[1]
    a = split_key_bias(jax_side[part])[1]
    rel[f'{part}_key_bias'] = max(
      (relative(a[n], b[n]) for n in b), default=0.0
    )
    rel[f'{part}_bn_bias'] = max(
      (relative(jax_side[part][n], official[part][n]) for n in cancelled),
      default=0.0,
    )
  scalar = set(SCALARS) | {'center'} | {f'grad_norm_{g}' for g in GROUPS}
  for quantity in (q for q in checked if q not in scalar):
    b = {n: v for n, v in official[quantity].items() if n not in cancelled}
    a = jax_side[quantity]
    if quantity in ('student', 'teacher'):
      a, b = split_key_bias(a)[0], split_key_bias(b)[0]
    missing = sorted(set(b) - set(a))
    if missing:
      raise LockstepError(f'{quantity}: no dino_jax tensor for {missing[:5]}')
    per_tensor = {n: relative(a[n], b[n]) for n in b}
    name = max(per_tensor, key=per_tensor.get)
    rel[quantity], worst[quantity] = per_tensor[name], name
  order = [*checked, *UNTRACKED]
  return {q: rel[q] for q in order}, worst


# ---------------------------------------------------------------------------


def check_recipe(config, steps: int) -> None:
  """Raises LockstepError naming what the lockstep cannot compare."""
  from dino_jax import config as config_lib

  if steps <= 0:
    raise LockstepError(f'--steps={steps}: use a positive number of steps')
  if config.steps_per_epoch <= 0:
    raise LockstepError(
      f'steps_per_epoch={config.steps_per_epoch}: the lockstep needs a fixed '
      'number; set --config.steps_per_epoch=N'
    )
  total = config.epochs * config.steps_per_epoch
  if steps > total:
    raise LockstepError(
      f'--steps={steps} exceeds epochs x steps_per_epoch = {total}; raise '
      '--config.epochs'
    )
  arch = config.model.arch
  if not (arch.startswith('vit_') or arch in RESNETS):
    raise LockstepError(
      f'model.arch={arch!r}: the official side builds the official '
      f'VisionTransformer or a torch ResNet; use a vit_* arch or one of '
      f'{", ".join(RESNETS)}'
    )
  if config.model.drop_path_rate:
    raise LockstepError(
      f'model.drop_path_rate={config.model.drop_path_rate}: the two sides '
      'would draw different stochastic-depth masks; use '
      '--config.model.drop_path_rate=0'
    )
  if config.optim.name not in OPT_STATE:
    raise LockstepError(
      f'optim.name={config.optim.name!r}: the lockstep runs the official '
      f'optimizers {", ".join(OPT_STATE)}; use one of them'
    )
  config_lib.validate(config)


def torch_resnet(arch: str, width: int):
  """The torch ResNet of tests/torch_resnet.py (torchvision's public
  definition, ``width`` its stem width) with torchvision's ``forward``:
  ``fc`` on the pooled features (``MultiCropWrapper`` makes it Identity)."""
  import torch_resnet as torch_resnet_lib

  return torch_resnet_lib.resnet(arch, width)


def official_optimizer(official, student, name: str):
  """``main_dino``'s optimizer for ``optim.name`` on ``get_params_groups``."""
  groups = official.utils.get_params_groups(student)
  if name == 'adamw':
    return torch.optim.AdamW(groups)
  if name == 'sgd':
    return torch.optim.SGD(groups, lr=0, momentum=0.9)
  return official.utils.LARS(groups)


def build_official(official, config, epochs: int, steps_per_epoch: int):
  """(student, teacher, dino_loss, optimizer, schedules) as ``main_dino``
  builds them: a ViT by ``convergence.build_official``; a ResNet here, its
  backbone ``torch_resnet`` (``main_dino``: ``torchvision_models[arch]()``,
  ``embed_dim = fc.weight.shape[1]``) with the loss and schedules of the
  ViT's build (built for a tiny ViT, then dropped)."""
  import copy

  from torch import nn

  m = config.model
  name = config.optim.name
  vit = copy.deepcopy(config)
  vit.optim.name = 'adamw'  # the optimizer is built below
  if m.arch in RESNETS:
    vit.model.arch = 'vit_tiny'
    vit.model.update(embed_dim=8, depth=1, num_heads=1, patch_size=8)
    vit.model.img_size = 8
  student, teacher, dino_loss, _, schedules = convergence.build_official(
    official, vit, epochs, steps_per_epoch
  )
  if m.arch in RESNETS:

    def network(**kwargs):
      backbone = torch_resnet(m.arch, m.resnet_width)
      head = official.vits.DINOHead(
        backbone.fc.weight.shape[1],
        m.out_dim,
        use_bn=m.use_bn_in_head,
        nlayers=m.head_nlayers,
        hidden_dim=m.head_hidden_dim,
        bottleneck_dim=m.head_bottleneck_dim,
        **kwargs,
      )
      return official.utils.MultiCropWrapper(backbone, head)

    student = nn.parallel.DistributedDataParallel(
      network(norm_last_layer=m.norm_last_layer)
    )
    teacher = network()
    teacher.load_state_dict(student.module.state_dict())
    for p in teacher.parameters():
      p.requires_grad = False
  optimizer = official_optimizer(official, student, name)
  return student, teacher, dino_loss, optimizer, schedules


def run_lockstep(
  official,
  config,
  steps: int,
  *,
  tol: float = 1e-3,
  jax_config=None,
  devices=None,
  emit=None,
) -> dict:
  """Trains both sides ``steps`` steps in lockstep.

  Args:
    official: ``convergence.load_official(repo)``.
    config: the recipe.
    steps: steps to run (within ``epochs * steps_per_epoch``).
    tol: the relative difference ``first_over`` reports beyond.
    jax_config: the dino_jax side's config if not ``config`` (a deliberately
      different side, to check that the tool sees a difference).
    devices: the dino_jax side's devices (default: all of JAX's).
    emit: called with each step's record (a dict).

  Returns:
    {'steps', 'max_rel', 'first_over', 'tol', 'max_at' (step and tensor of
    each maximum), 'untracked_max_rel' (UNTRACKED), 'sec_per_step'}.
  """
  check_recipe(config, steps)
  # main_dino wraps the student in DDP and all-reduces the center: a
  # process group of one process, as init_distributed_mode makes.
  with convergence.single_process_group():
    return _run(
      official,
      config,
      steps,
      tol=tol,
      jax_config=config if jax_config is None else jax_config,
      devices=devices,
      emit=emit,
    )


def _run(official, config, steps, *, tol, jax_config, devices, emit) -> dict:
  import jax

  spe = config.steps_per_epoch
  utils, main_dino = official.utils, official.main_dino
  utils.fix_random_seeds(config.seed)
  random.seed(config.seed)  # blur and solarization (fix_random_seeds skips it)
  student, teacher, dino_loss, optimizer, schedules = build_official(
    official, config, config.epochs, spe
  )
  probe = OfficialProbe(
    dict(
      student=student,
      teacher=teacher,
      dino_loss=dino_loss,
      optimizer=optimizer,
    ),
    schedules,
    config.optim.name,
  )
  checked = quantities(config)
  jax_side = JaxSide(jax_config, spe, student, devices or jax.devices())

  from dino_jax.data import sources

  source = sources.make_source(config.data, config.data.split)
  dataset = convergence.CropDataset(
    source, convergence.MultiCropTransform(utils, config.crops)
  )
  sampler = convergence.StreamSampler(
    len(source), spe * config.batch_size, config.seed
  )
  loader = torch.utils.data.DataLoader(
    dataset, sampler=sampler, batch_size=config.batch_size, drop_last=True
  )
  logger_class = convergence._logger_class(utils)
  logger_class.losses = []
  max_rel = dict.fromkeys(checked, 0.0)
  untracked = dict.fromkeys(UNTRACKED, 0.0)
  max_at = {}
  first_over = None
  sec = {'official': 0.0, 'jax': 0.0, 'compare': 0.0}

  def after_step(step: int, images) -> None:
    nonlocal first_over
    sec['official'] += time.perf_counter() - after_step.start
    start = time.perf_counter()
    jax_side.step(images)
    jax.block_until_ready(jax_side.state)
    sec['jax'] += time.perf_counter() - start
    start = time.perf_counter()
    theirs = jax_side.snapshot()
    ours = probe.snapshot(step, step // spe, logger_class.losses[-1])
    rel, worst = compare(ours, theirs, probe.groups, checked)
    sec['compare'] += time.perf_counter() - start
    for q in UNTRACKED:
      untracked[q] = max(untracked[q], rel[q])
    for q in checked:
      if rel[q] > max_rel[q]:
        max_rel[q] = rel[q]
        max_at[q] = {
          'step': step,
          **({'tensor': worst[q]} if q in worst else {}),
        }
      if first_over is None and not rel[q] <= tol:
        first_over = {'step': step, 'quantity': q, 'rel': rel[q]}
        if q in worst:
          first_over['tensor'] = worst[q]
    if emit is not None:
      emit(
        {
          'step': step,
          'official': ours['scalars'],
          'jax': theirs['scalars'],
          'rel': rel,
          'worst': worst,
          'sec': dict(sec),  # cumulative
        }
      )
    after_step.start = time.perf_counter()

  class Loader:
    """One epoch's batches for ``train_one_epoch``, the comparison after
    each step (when the loop asks for the next batch)."""

    def __init__(self, epoch):
      self.epoch = epoch

    def __len__(self):
      return spe  # train_one_epoch indexes the schedules by len * epoch + it

    def __iter__(self):
      first = self.epoch * spe
      batches = iter(loader)
      for step in range(first, min(first + spe, steps)):
        images, labels = next(batches)
        after_step.start = time.perf_counter()
        yield images, labels
        after_step(step, images)

  args = argparse.Namespace(
    epochs=config.epochs,
    clip_grad=config.optim.clip_grad,
    freeze_last_layer=config.optim.freeze_last_layer,
  )
  saved_logger, utils.MetricLogger = utils.MetricLogger, logger_class
  try:
    with (
      convergence.cuda_calls_on_cpu(),
      contextlib.redirect_stdout(sys.stderr),
    ):
      for epoch in range(math.ceil(steps / spe)):
        sampler.set_epoch(epoch)
        main_dino.train_one_epoch(
          student,
          teacher,
          teacher,  # teacher_without_ddp: the teacher is not wrapped
          dino_loss,
          Loader(epoch),
          optimizer,
          schedules['lr_schedule'],
          schedules['wd_schedule'],
          schedules['momentum_schedule'],
          epoch,
          None,  # fp16_scaler: float32
          args,
        )
  finally:
    utils.MetricLogger = saved_logger
  return {
    'steps': steps,
    'max_rel': max_rel,
    'first_over': first_over,
    'tol': tol,
    'max_at': max_at,
    'untracked_max_rel': untracked,
    'sec_per_step': {k: v / steps for k, v in sec.items()},
  }


def summarize(path: str, at) -> str:
  """A markdown table of a ``--out`` file: per quantity, the largest
  relative difference over the first N steps, for each N in ``at``."""
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if not rows:
    raise ValueError('no steps recorded yet')
  at = [n for n in at if n <= len(rows)] or [len(rows)]
  head = ' | '.join(f'{n} steps' for n in at)
  lines = [f'| quantity | {head} |', '|---' * (len(at) + 1) + '|']
  for q in rows[0]['rel']:  # the run's quantities, then UNTRACKED
    cells = ' | '.join(f'{max(r["rel"][q] for r in rows[:n]):.1e}' for n in at)
    lines.append(f'| {q} | {cells} |')
  return '\n'.join(lines)


def parse_args(argv=None):
  from dino_jax.cli import flags as cli_flags

  argv = sys.argv if argv is None else [sys.argv[0], *argv]
  rest, overrides = cli_flags.split_overrides(argv)
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--official_repo', help='a facebookresearch/dino checkout')
  p.add_argument('--steps', type=int, default=50)
  p.add_argument('--config', default=DEFAULT_CONFIG, help='FILE[:ARG]')
  p.add_argument('--tol', type=float, default=1e-3)
  p.add_argument('--threads', type=int, default=0, help='CPU cores (0: all)')
  p.add_argument(
    '--devices', type=int, default=0, help="dino_jax's devices (0: all)"
  )
  p.add_argument('--out', default=None, help='one JSON line per step here')
  p.add_argument(
    '--summarize',
    metavar='JSONL',
    help='run nothing: the table of max_rel of an --out file at --at steps',
  )
  p.add_argument('--at', default='1,10,50,100,200,360')
  args = p.parse_args(rest[1:])
  if not args.summarize and not args.official_repo:
    p.error('--official_repo=PATH is required (or --summarize JSONL)')
  try:
    args.at = [int(n) for n in args.at.split(',') if n]
  except ValueError:
    p.error(f'--at={args.at!r}: use a comma list of step counts')
  args.overrides = overrides
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.summarize:
    try:
      print(summarize(args.summarize, args.at))
    except (OSError, ValueError, KeyError) as e:
      print(f'error: --summarize {args.summarize}: {e}', file=sys.stderr)
      return 1
    return 0
  if not os.environ.get('JAX_PLATFORMS'):
    import jax

    # Both sides on the CPU (torch is CPU here); and no accelerator probe.
    jax.config.update('jax_platforms', 'cpu')
  if args.threads:
    cpus = sorted(os.sched_getaffinity(0))[: args.threads]
    os.sched_setaffinity(0, cpus)  # before XLA sizes its thread pools
    torch.set_num_threads(args.threads)
  from dino_jax.cli import flags as cli_flags
  from dino_jax.config import ConfigError

  try:
    config = cli_flags.load_config_file(args.config, args.overrides)
    official = convergence.load_official(args.official_repo)
    import jax

    devices = jax.devices()[: args.devices or None]
    out = open(args.out, 'w') if args.out else None  # noqa: SIM115

    def emit(row):
      if out:
        out.write(json.dumps(row) + '\n')
        out.flush()
      rel = {q: v for q, v in row['rel'].items() if q not in UNTRACKED}
      print(
        f'step {row["step"]}: loss {row["official"]["loss"]:.6f} '
        f'max rel {max(rel.values()):.2e} ({max(rel, key=rel.get)})',
        file=sys.stderr,
        flush=True,
      )

    result = run_lockstep(
      official, config, args.steps, tol=args.tol, devices=devices, emit=emit
    )
    if out:
      out.close()
  except (
    LockstepError,
    ConfigError,
    cli_flags.ConfigOverrideError,
    FileNotFoundError,
    ImportError,
  ) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(json.dumps(result), flush=True)
  return 0


if __name__ == '__main__':
  from dino_jax import hostmem

  hostmem.configure()  # XLA:CPU's malloc settings, as the trainer
  sys.exit(main())
