"""ResNet checkpoints in and out: an official-layout full checkpoint of a
torch ResNet (torchvision's layout, tests/test_resnet.py) and the official
``vision_transformer.DINOHead`` with BatchNorm, imported, evaluated, and
exported back to keys both load with ``strict=True``.
"""

import importlib.util
import os
import sys
import tempfile

import jax
import numpy as np
import torch
from absl.testing import absltest
from test_resnet import _torch_model
from tiny import tiny_config

from dino_jax import interop
from dino_jax import step as step_lib
from dino_jax import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL = os.path.join(os.path.dirname(ROOT), 'shared', 'official-dino')
HIDDEN, BOTTLENECK, K = 32, 16, 64
WIDTH = 8  # resnet18 narrowed 8x: 8 to 64 channels


def official_head_class():
  sys.path.insert(0, OFFICIAL)  # vision_transformer imports utils
  try:
    spec = importlib.util.spec_from_file_location(
      'official_vit_p39', os.path.join(OFFICIAL, 'vision_transformer.py')
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(OFFICIAL)
  return module.DINOHead


def torch_network(seed, head_cls):
  """(backbone with fc = Identity, head with random BN statistics)."""
  backbone = _torch_model('resnet18', seed, WIDTH)
  backbone.fc = torch.nn.Identity()
  torch.manual_seed(seed + 10)
  head = head_cls(
    8 * WIDTH,
    K,
    use_bn=True,
    hidden_dim=HIDDEN,
    bottleneck_dim=BOTTLENECK,
  )
  g = torch.Generator().manual_seed(seed + 20)
  with torch.no_grad():
    for mod in head.modules():
      if isinstance(mod, torch.nn.BatchNorm1d):
        c = mod.num_features
        mod.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
        mod.bias.copy_(0.1 * torch.randn(c, generator=g))
        mod.running_mean.copy_(0.1 * torch.randn(c, generator=g))
        mod.running_var.copy_(0.5 + torch.rand(c, generator=g))
  return backbone.eval(), head.eval()


def prefixed(prefix, backbone, head):
  out = {f'{prefix}backbone.{k}': v for k, v in backbone.state_dict().items()}
  out.update({f'{prefix}head.{k}': v for k, v in head.state_dict().items()})
  return out


def resnet_config():
  config = tiny_config()
  config.model.arch = 'resnet18'
  config.model.resnet_width = WIDTH
  config.model.use_bn_in_head = True
  config.model.out_dim = K
  config.model.head_hidden_dim = HIDDEN
  config.model.head_bottleneck_dim = BOTTLENECK
  config.optim.name = 'sgd'
  return config


class ResNetInteropTest(absltest.TestCase):
  def test_full_checkpoint_round_trip_through_torch(self):
    head_cls = official_head_class()
    teacher_t = torch_network(0, head_cls)
    student_t = torch_network(1, head_cls)
    center = torch.randn(1, K)
    config = resnet_config()
    with tempfile.TemporaryDirectory() as tmp:
      pth = os.path.join(tmp, 'in.pth')
      torch.save(
        {
          'student': prefixed('module.', *student_t),
          'teacher': prefixed('', *teacher_t),
          'dino_loss': {'center': center},
          'epoch': 0,
        },
        pth,
      )
      workdir = os.path.join(tmp, 'wd')
      interop.import_checkpoint(pth, workdir, config)
      config, _, state, _ = workdir_lib.load_workdir(workdir)
      # Inference with the imported teacher equals torch's eval mode: the
      # running statistics of the backbone and the head came along.
      _, teacher = step_lib.build_models(config)
      x = np.random.default_rng(0).normal(size=(2, 40, 48, 3))
      variables = {
        'params': state.teacher,
        'batch_stats': state.batch_stats['teacher'],
      }
      got = teacher.apply(variables, x[None].astype(np.float32))[0]
      with torch.no_grad():
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).float()
        want = teacher_t[1](teacher_t[0].features(xt)).numpy()
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
      np.testing.assert_array_equal(state.center, center.numpy())

      out = os.path.join(tmp, 'out.pth')
      payload = interop.export_checkpoint(workdir, out, what='full')
    for name, prefix, (backbone, head) in (
      ('teacher', '', teacher_t),
      ('student', 'module.', student_t),
    ):
      fresh_b = _torch_model('resnet18', 7, WIDTH)
      fresh_b.fc = torch.nn.Identity()
      fresh_h = head_cls(
        8 * WIDTH, K, use_bn=True, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK
      )
      sd = payload[name]
      fresh_b.load_state_dict(
        {
          k[len(prefix + 'backbone.') :]: v
          for k, v in sd.items()
          if k.startswith(prefix + 'backbone.')
        },
        strict=True,
      )
      fresh_h.load_state_dict(
        {
          k[len(prefix + 'head.') :]: v
          for k, v in sd.items()
          if k.startswith(prefix + 'head.')
        },
        strict=True,
      )
      for mine, theirs in ((fresh_b, backbone), (fresh_h, head)):
        want = theirs.state_dict()
        for key, value in mine.state_dict().items():
          if key.endswith('num_batches_tracked'):
            continue
          np.testing.assert_array_equal(
            value.numpy(), want[key].numpy(), err_msg=f'{name} {key}'
          )

  def test_released_head_plain_last_layer(self):
    # The released dino_resnet50_pretrain_full_checkpoint.pth's head: the
    # official DINOHead with 2 layers and a plain Linear(bottleneck, K, no
    # bias) as last layer (facebookresearch/dino#189): keys mlp.0, mlp.2,
    # last_layer.weight. configs/resnet50.py:released builds it.
    head_cls = official_head_class()

    def network(seed):
      backbone = _torch_model('resnet18', seed, WIDTH)
      backbone.fc = torch.nn.Identity()
      torch.manual_seed(seed + 10)
      head = head_cls(
        8 * WIDTH, K, nlayers=2, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK
      )
      head.last_layer = torch.nn.Linear(BOTTLENECK, K, bias=False)
      return backbone.eval(), head.eval()

    teacher_t, student_t = network(4), network(5)
    self.assertEqual(
      sorted(k for k in teacher_t[1].state_dict()),
      ['last_layer.weight', 'mlp.0.bias', 'mlp.0.weight', 'mlp.2.bias']
      + ['mlp.2.weight'],
    )
    config = resnet_config()
    config.model.use_bn_in_head = False
    with tempfile.TemporaryDirectory() as tmp:
      pth = os.path.join(tmp, 'released.pth')
      torch.save(
        {
          'student': prefixed('module.', *student_t),
          'teacher': prefixed('', *teacher_t),
          'dino_loss': {'center': torch.zeros(1, K)},
          'epoch': 0,
        },
        pth,
      )
      # The config's head (3 layers, weight norm) does not fit: one error
      # naming the overrides that give the file's head.
      with self.assertRaisesRegex(
        interop.InteropError,
        r'does not fit the model of the config \(arch resnet18\): .*; pass '
        r'--config.model.head_nlayers=2 --config.model.head_weight_norm=false '
        r'\(the head of the file\)$',
      ):
        interop.import_checkpoint(pth, os.path.join(tmp, 'bad'), config)
      self.assertFalse(os.path.exists(os.path.join(tmp, 'bad')))
      config.model.head_nlayers = 2
      config.model.head_weight_norm = False
      workdir = os.path.join(tmp, 'wd')
      interop.import_checkpoint(pth, workdir, config)
      config, _, state, _ = workdir_lib.load_workdir(workdir)
      self.assertEqual(
        state.teacher['head']['last_layer']['kernel'].shape, (BOTTLENECK, K)
      )
      _, teacher = step_lib.build_models(config)
      x = np.random.default_rng(1).normal(size=(2, 40, 48, 3))
      variables = {
        'params': state.teacher,
        'batch_stats': state.batch_stats['teacher'],
      }
      got = teacher.apply(variables, x[None].astype(np.float32))[0]
      with torch.no_grad():
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).float()
        want = teacher_t[1](teacher_t[0].features(xt)).numpy()
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
      payload = interop.export_checkpoint(
        workdir, os.path.join(tmp, 'out.pth'), what='full'
      )
    for name, prefix, (_, head) in (
      ('teacher', '', teacher_t),
      ('student', 'module.', student_t),
    ):
      sd = payload[name]
      got = {
        k[len(prefix + 'head.') :]: v
        for k, v in sd.items()
        if k.startswith(prefix + 'head.')
      }
      fresh = network(9)[1]
      fresh.load_state_dict(got, strict=True)
      for key, value in head.state_dict().items():
        np.testing.assert_array_equal(got[key].numpy(), value.numpy(), key)

  def test_backbone_only_file_seeds_both_statistics(self):
    backbone, _ = torch_network(3, official_head_class())
    config = resnet_config()
    with tempfile.TemporaryDirectory() as tmp:
      pth = os.path.join(tmp, 'rn.pth')
      torch.save(backbone.state_dict(), pth)  # torchvision keys, fc Identity
      workdir = os.path.join(tmp, 'wd')
      interop.import_checkpoint(pth, workdir, config)
      _, _, state, _ = workdir_lib.load_workdir(workdir)
      out = os.path.join(tmp, 'out.pth')
      payload = interop.export_checkpoint(workdir, out)
    want = backbone.state_dict()
    self.assertEqual(set(payload), set(want))
    for name in ('student', 'teacher'):
      var = state.batch_stats[name]['backbone']['layer2_0']['bn1']['var']
      np.testing.assert_array_equal(
        var, want['layer2.0.bn1.running_var'].numpy()
      )
    for key, value in want.items():
      if not key.endswith('num_batches_tracked'):
        np.testing.assert_array_equal(payload[key].numpy(), value.numpy())


if __name__ == '__main__':
  jax.config.update('jax_platforms', 'cpu')
  absltest.main()
