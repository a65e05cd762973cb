"""The ResNet recipe: SGD and LARS against the official optimizers, the
config's schedules against the official arrays, use_bn_in_head in the step.

The official ``utils.py`` (LARS, cosine_scheduler) is loaded by path;
torch.optim.SGD is what main_dino.py uses for ``--optimizer sgd``.
"""

import importlib.util
import os

import jax
import numpy as np
import torch
from absl.testing import absltest, parameterized
from tiny import crop_batch, tiny_config

from dino_jax import config as config_lib
from dino_jax import optim
from dino_jax import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = os.path.join(os.path.dirname(ROOT), 'shared', 'official-dino')


def official_utils():
  spec = importlib.util.spec_from_file_location(
    'official_dino_utils_p39', os.path.join(OFFICIAL, 'utils.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path, arg=None):
  spec = importlib.util.spec_from_file_location('cfg_p39', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def toy_params(rng):
  """Kernels (decayed, adapted), a bias and a 1-D scale (neither), and a
  zero kernel (LARS's ratio is 1 where a norm is 0)."""
  return {
    'conv': {'kernel': rng.normal(size=(3, 3, 2, 4))},
    'dense': {'kernel': rng.normal(size=(5, 4)), 'bias': rng.normal(size=4)},
    'bn': {'scale': 1 + 0.1 * rng.normal(size=4)},
    'zero': {'kernel': np.zeros((4, 3))},
  }


class OfficialOptimizerTest(parameterized.TestCase):
  @parameterized.parameters('sgd', 'lars')
  def test_steps_equal_the_official_optimizer(self, name):
    rng = np.random.default_rng(0)
    params = toy_params(rng)
    steps = 5
    lrs = np.array([0.5, 0.2, 1.0, 0.05, 0.3])  # changes every step
    wds = np.array([0.1, 0.3, 0.05, 0.2, 0.4])
    grads = [
      jax.tree.map(lambda p: rng.normal(size=p.shape), params)
      for _ in range(steps)
    ]
    # Official: param groups as utils.get_params_groups, lr and wd of the
    # regularized group set from the schedules before each step.
    leaves, treedef = jax.tree.flatten(params)
    tensors = [torch.tensor(x, dtype=torch.float64) for x in leaves]
    paths = [
      jax.tree_util.keystr(p)
      for p, _ in jax.tree_util.tree_leaves_with_path(params)
    ]
    reg = [
      t
      for t, p in zip(tensors, paths, strict=True)
      if not p.endswith("['bias']") and t.ndim != 1
    ]
    not_reg = [t for t in tensors if all(t is not r for r in reg)]
    groups = [{'params': reg}, {'params': not_reg, 'weight_decay': 0.0}]
    if name == 'sgd':
      official = torch.optim.SGD(groups, lr=0, momentum=0.9)
    else:
      official = official_utils().LARS(groups)
    for it in range(steps):
      for i, group in enumerate(official.param_groups):
        group['lr'] = lrs[it]
        if i == 0:
          group['weight_decay'] = wds[it]
      for t, g in zip(tensors, jax.tree.leaves(grads[it]), strict=True):
        t.grad = torch.tensor(g, dtype=torch.float64)
      official.step()

    jax.config.update('jax_enable_x64', True)
    try:
      tx = optim.make_optimizer(name, lrs, wds, clip_grad=0, freeze_steps=0)
      p = jax.tree.map(np.asarray, params)
      state = tx.init(p)
      for g in grads:
        updates, state = tx.update(g, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
      got = jax.tree.leaves(jax.device_get(p))
    finally:
      jax.config.update('jax_enable_x64', False)
    # float64 parameters; the lr and wd tables are float32 (optim._indexer).
    for path, a, t in zip(paths, got, tensors, strict=True):
      np.testing.assert_allclose(a, t.numpy(), rtol=1e-6, err_msg=path)
    # The decay and the adaptation did act: the kernels moved differently
    # from plain momentum SGD (they would match it without wd and eta).
    plain = params['dense']['kernel'].copy()
    mu = np.zeros_like(plain)
    for it, g in enumerate(grads):
      mu = 0.9 * mu + g['dense']['kernel']
      plain = plain - lrs[it] * mu
    self.assertGreater(
      np.abs(plain - got[paths.index("['dense']['kernel']")]).max(), 1e-3
    )

  def test_unknown_optimizer_is_refused(self):
    config = config_lib.default_config()
    config.optim.name = 'adam'
    with self.assertRaisesRegex(
      config_lib.ConfigError, r"optim.name='adam'; use one of"
    ):
      config_lib.validate(config)


class ResNetConfigTest(absltest.TestCase):
  def test_recipe_schedules_equal_the_official_arrays(self):
    config = load_config(os.path.join(ROOT, 'configs', 'resnet50.py'))
    config_lib.validate(config, num_devices=8)
    self.assertEqual(config.model.arch, 'resnet50')
    self.assertEqual(config.optim.name, 'sgd')
    self.assertEqual(tuple(config.crops.global_scale), (0.14, 1.0))
    self.assertEqual(tuple(config.crops.local_scale), (0.05, 0.14))
    utils = official_utils()
    niter = 1281167 // 512  # ImageNet-1k at 8 x 64, drop_last
    sched = step_lib.Schedules.from_config(config, niter)
    # main_dino.py: lr * batch / 256, min_lr 1e-6, 10 warmup epochs.
    lr = utils.cosine_scheduler(0.03 * 512 / 256.0, 1e-6, 100, niter, 10)
    wd = utils.cosine_scheduler(1e-4, 1e-4, 100, niter)
    np.testing.assert_array_equal(sched.lr, lr)
    np.testing.assert_allclose(sched.weight_decay, wd, rtol=1e-15)
    np.testing.assert_allclose(sched.weight_decay, 1e-4, rtol=1e-12)

  def test_smoke_variant_builds_a_resnet(self):
    config = load_config(os.path.join(ROOT, 'configs', 'resnet50.py'), 'smoke')
    config_lib.validate(config)
    student, teacher = step_lib.build_models(config)
    self.assertEqual(student.backbone.num_features, 64)
    self.assertEqual(teacher.backbone.width, 8)


class BatchNormHeadTest(absltest.TestCase):
  def test_vit_with_bn_in_head_trains_both_statistics(self):
    config = tiny_config(batch_size=8)
    config.model.use_bn_in_head = True
    config.model.drop_path_rate = 0.0  # the reference below has none
    config_lib.validate(config)  # refused before issue 39
    sched = step_lib.Schedules.from_config(config, 5)
    student, teacher = step_lib.build_models(config)
    tx = step_lib.build_optimizer(config, sched)
    state = jax.jit(step_lib.init_fn_for(config, student, tx))()
    self.assertEqual(set(state.batch_stats['student']), {'head'})
    batch = crop_batch(0, 8)
    new, _ = jax.jit(step_lib.make_train_step(student, teacher, tx, sched))(
      state, batch
    )

    # The head's first BatchNorm sees the backbone features of every crop
    # (one head pass over all rows): its running mean after one step is 0.1
    # times their mean through mlp_0, for the student; the teacher's is
    # over the global crops only.
    def first_linear(params, crops, n_views):
      rows = crops.reshape(-1, *crops.shape[2:])
      feats = student.backbone.apply({'params': params['backbone']}, rows)
      dense = params['head']['mlp_0']
      return (feats @ dense['kernel'] + dense['bias']).reshape(
        n_views, -1, dense['kernel'].shape[1]
      )

    g = first_linear(state.student, batch['global_crops'], 2)
    loc = first_linear(state.student, batch['local_crops'], 2)
    rows = np.concatenate([np.asarray(g), np.asarray(loc)]).reshape(
      -1, g.shape[-1]
    )
    s = new.batch_stats['student']['head']['mlp_1']
    np.testing.assert_allclose(s['mean'], 0.1 * rows.mean(0), atol=2e-6)
    np.testing.assert_allclose(
      s['var'], 0.9 + 0.1 * rows.var(0, ddof=1), rtol=2e-5
    )
    t = new.batch_stats['teacher']['head']['mlp_1']
    g = np.asarray(g).reshape(-1, g.shape[-1])
    np.testing.assert_allclose(t['mean'], 0.1 * g.mean(0), atol=2e-6)


if __name__ == '__main__':
  absltest.main()
