"""ResNet parity with a torch reference of torchvision's resnet (SPEC §5).

The reference (tests/torch_resnet.py) is written from torchvision's public
definition with torch.nn only (torchvision is not importable here).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn
from torch_resnet import ARCHS as _TORCH
from torch_resnet import ResNet as _TorchResNet

from dino_jax.models import resnet

# ---------------------------------------------------------------- reference


def _torch_model(arch, seed=0, width=64):
  torch.manual_seed(seed)
  block, layers = _TORCH[arch]
  m = _TorchResNet(block, layers, width=width)
  # Non-trivial affine and running statistics, so eval mode tests them.
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for mod in m.modules():
      if isinstance(mod, tnn.BatchNorm2d):
        c = mod.num_features
        mod.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
        mod.bias.copy_(0.1 * torch.randn(c, generator=g))
        mod.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        mod.running_var.copy_(0.5 + torch.rand(c, generator=g))
  return m


def _np_state(m):
  return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


def _compare(arch, shape, train, seed=0):
  tm = _torch_model(arch, seed)
  sd0 = _np_state(tm)
  variables = resnet.from_torchvision(tm.state_dict())
  x = np.random.RandomState(seed).randn(*shape).astype(np.float32)
  tm.train(train)
  tm64 = _torch_model(arch, seed).double().train(train)
  with torch.no_grad():
    ref32 = tm.features(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    xt64 = torch.from_numpy(x).double().permute(0, 3, 1, 2)
    ref = tm64.features(xt64).numpy()
  model = resnet.ARCHS[arch]()
  t0 = time.time()
  if train:
    out, upd = model.apply(
      variables, jnp.asarray(x), train=True, mutable=['batch_stats']
    )
  else:
    out, upd = model.apply(variables, jnp.asarray(x), train=False), None
  out = np.asarray(out)
  dt = time.time() - t0
  assert out.shape == ref.shape == (shape[0], model.num_features)
  # Against a float64 torch reference: 1e-4 of the output's scale, or, where
  # float32 itself cannot reach that (train mode with few values per channel
  # in layer4: 8 for resnet50 at 64x64 batch 2), no worse than torch float32.
  scale = np.abs(ref).max()
  err = np.abs(out - ref).max()
  err_torch32 = np.abs(ref32 - ref).max()
  tol = max(1e-4 * max(scale, 1.0), 1.5 * err_torch32)
  assert err <= tol, (arch, shape, train, err, err_torch32, scale)
  if train:
    new = resnet.to_torchvision({**variables, **upd})
    sd32, sd64 = _np_state(tm), _np_state(tm64)
    for k, v in sd64.items():
      if k.endswith(('running_mean', 'running_var')):
        assert not np.allclose(v, sd0[k]), k  # torch did update it
        e, e32 = np.abs(new[k] - v).max(), np.abs(sd32[k] - v).max()
        assert e <= max(1e-4 * np.abs(v).max(), 1.5 * e32), (k, e, e32)
  return err, err_torch32, scale, dt


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('shape', [(2, 64, 64, 3), (2, 37, 53, 3)])
def test_resnet18_parity(shape, train):
  _compare('resnet18', shape, train)


@pytest.mark.parametrize('train', [False, True])
def test_resnet50_parity(train):
  _compare('resnet50', (2, 64, 64, 3), train)


@pytest.mark.slow
@pytest.mark.parametrize('train', [False, True])
def test_resnet50_parity_224(train):
  _compare('resnet50', (2, 224, 224, 3), train)


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_torchvision_round_trip(arch):
  tm = _torch_model(arch)
  sd = {k: v for k, v in _np_state(tm).items() if not k.startswith('fc.')}
  # num_batches_tracked is written as 0 on export.
  for k in sd:
    if k.endswith('num_batches_tracked'):
      sd[k] = np.zeros((), np.int64)
  back = resnet.to_torchvision(resnet.from_torchvision(sd))
  assert set(back) == set(sd)
  for k, v in sd.items():
    assert back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_init_layout_matches_torch():
  """Flax init has torchvision's keys, shapes and init statistics."""
  for arch in ('resnet50', 'resnet34'):
    tm = _torch_model(arch)
    sd = {k: v for k, v in _np_state(tm).items() if not k.startswith('fc.')}
    shapes = jax.eval_shape(
      lambda k, a=arch: resnet.ARCHS[a]().init(
        k, jnp.zeros((1, 32, 32, 3)), False
      ),
      jax.random.PRNGKey(0),
    )
    zeros = jax.tree_util.tree_map(lambda t: np.zeros(t.shape, t.dtype), shapes)
    exported = resnet.to_torchvision(zeros)
    assert set(exported) == set(sd), arch
    for k, v in sd.items():
      assert exported[k].shape == v.shape, k
  init18 = jax.jit(resnet.resnet18().init, static_argnums=2)
  variables = init18(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), False)
  exported = resnet.to_torchvision(variables)
  # Kaiming normal, fan_out, relu: std sqrt(2 / (out * kh * kw)).
  w = exported['layer4.0.conv2.weight']
  o, _, kh, kw = w.shape
  assert abs(w.std() / np.sqrt(2.0 / (o * kh * kw)) - 1) < 0.05
  assert abs(w.mean()) < 0.05 * w.std()
  assert np.all(exported['bn1.weight'] == 1)
  assert np.all(exported['bn1.bias'] == 0)
  assert np.all(exported['bn1.running_mean'] == 0)
  assert np.all(exported['bn1.running_var'] == 1)
  assert np.all(exported['layer1.0.bn2.weight'] == 1)
  tiny = resnet.ResNet('basic', (1, 1, 1, 1), zero_init_residual=True)
  zero = jax.jit(tiny.init, static_argnums=2)(
    jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), False
  )
  assert np.all(np.asarray(zero['params']['layer1_0']['bn2']['scale']) == 0)
  assert np.all(np.asarray(zero['params']['layer1_0']['bn1']['scale']) == 1)


def test_flax_batchnorm_would_differ():
  """Flax's nn.BatchNorm keeps the biased variance; ours keeps torch's."""
  x = jnp.asarray(np.random.RandomState(0).randn(2, 3, 3, 4), jnp.float32)
  ours = resnet.BatchNorm()
  v = ours.init(jax.random.PRNGKey(0), x, True)
  _, upd = ours.apply(v, x, True, mutable=['batch_stats'])
  flax_bn = jax.tree_util.tree_map(lambda a: a, v)
  _, fupd = resnet.nn.BatchNorm(
    use_running_average=False, momentum=0.9, epsilon=1e-5
  ).apply(flax_bn, x, mutable=['batch_stats'])
  n = 18
  biased = np.asarray(x).reshape(-1, 4).var(0)
  np.testing.assert_allclose(
    upd['batch_stats']['var'], 0.9 + 0.1 * biased * n / (n - 1), rtol=1e-5
  )
  np.testing.assert_allclose(
    fupd['batch_stats']['var'], 0.9 + 0.1 * biased, rtol=1e-5
  )
