"""Parity with a PyTorch DINO written from SPEC; import/export round trips."""

import argparse
import fractions
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch_dino
from absl.testing import absltest, parameterized

from dino_jax import interop, models


class RunsCode:
  """Unpickling this would call a function: must be refused."""

  ran = False

  def __reduce__(self):
    return (_mark_ran, ())


def _mark_ran():
  RunsCode.ran = True


def tiny_vit():
  return models.VisionTransformer(
    patch_size=16, embed_dim=64, depth=3, num_heads=4, img_size=224
  )


def torch_state(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


class LayerNormTest(absltest.TestCase):
  def test_matches_torch_with_large_token_means(self):
    """Two-pass variance: tokens with mean 50 and std 0.5 stay exact."""
    rs = np.random.RandomState(0)
    x = (rs.randn(2, 8, 384) * 0.5 + rs.randn(2, 8, 1) * 50).astype(np.float32)
    g = rs.randn(2, 8, 384).astype(np.float32)
    ln_t = torch.nn.LayerNorm(384, eps=1e-6)
    with torch.no_grad():
      ln_t.weight.copy_(torch.from_numpy(rs.rand(384).astype(np.float32)))
      ln_t.bias.copy_(torch.from_numpy(rs.randn(384).astype(np.float32)))
    xt = torch.from_numpy(x).requires_grad_()
    yt = ln_t(xt)
    (yt * torch.from_numpy(g)).sum().backward()
    params = {
      'scale': jnp.asarray(ln_t.weight.detach().numpy()),
      'bias': jnp.asarray(ln_t.bias.detach().numpy()),
    }
    ln = models.vit.LayerNorm()

    def loss(params, x):
      return jnp.sum(ln.apply({'params': params}, x) * g)

    y = ln.apply({'params': params}, x)
    self.assertLess(np.abs(y - yt.detach().numpy()).max(), 1e-4)
    d_params, d_x = jax.grad(loss, argnums=(0, 1))(params, x)
    self.assertLess(rel_err(d_x, xt.grad.numpy()), 1e-4)
    self.assertLess(rel_err(d_params['scale'], ln_t.weight.grad.numpy()), 1e-5)
    self.assertLess(rel_err(d_params['bias'], ln_t.bias.grad.numpy()), 1e-5)


class ParityTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    torch.manual_seed(0)
    cls.torch_vit = torch_dino.ViT().eval()
    cls.model = tiny_vit()
    cls.variables = interop.from_pytorch(torch_state(cls.torch_vit), cls.model)

  def images(self, h, w):
    x = np.random.RandomState(h + w).randn(2, h, w, 3).astype(np.float32)
    return x, torch.from_numpy(x).permute(0, 3, 1, 2)

  @parameterized.parameters((224, 224), (96, 96), (224, 160))
  def test_cls_attention_and_intermediate(self, h, w):
    x, xt = self.images(h, w)
    with torch.no_grad():
      ref_cls = self.torch_vit(xt).numpy()
      ref_attn = self.torch_vit.last_self_attention(xt).numpy()
      ref_layers = [
        t.numpy() for t in self.torch_vit.intermediate_layers(xt, 2)
      ]
    cls = self.model.apply(self.variables, x)
    attn = self.model.apply(self.variables, x, method='last_self_attention')
    layers = self.model.apply(
      self.variables, x, n=2, method='intermediate_layers'
    )
    self.assertLess(rel_err(cls, ref_cls), 1e-5)
    self.assertLess(rel_err(attn, ref_attn), 1e-5)
    self.assertLen(layers, 2)
    for ours, ref in zip(layers, ref_layers, strict=True):
      self.assertLess(rel_err(ours, ref), 1e-5)

  @parameterized.parameters((224, 224), (96, 128))
  def test_gradients_match(self, h, w):
    """Parameter gradients of sum(sin(CLS)) equal PyTorch's autograd."""
    x, xt = self.images(h, w)
    self.torch_vit.zero_grad()
    torch.sin(self.torch_vit(xt)).sum().backward()
    ref = interop.from_pytorch(
      {
        k: p.grad.numpy()
        for k, p in self.torch_vit.named_parameters()
        if p.grad is not None
      },
      self.model,
    )['params']

    def loss(params):
      return jnp.sum(jnp.sin(self.model.apply({'params': params}, x)))

    grads = jax.grad(loss)(self.variables['params'])
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    self.assertLen(flat, len(jax.tree.leaves(ref)))
    for path, ours in flat:
      theirs = ref
      for key in path:
        theirs = theirs[key.key]
      name = jax.tree_util.keystr(path)
      self.assertLess(rel_err(ours, theirs), 1e-4, name)

  def test_head(self):
    torch.manual_seed(1)
    head_t = torch_dino.Head(64, 100)
    with torch.no_grad():  # a trained-looking g
      head_t.last_layer.parametrizations.weight.original0.uniform_(0.5, 1.5)
    head = models.DINOHead(
      100, norm_last_layer=False, hidden_dim=48, bottleneck_dim=16
    )
    variables = interop.from_pytorch(torch_state(head_t), head)
    x = np.random.RandomState(3).randn(5, 64).astype(np.float32)
    with torch.no_grad():
      ref = head_t(torch.from_numpy(x)).numpy()
    self.assertLess(rel_err(head.apply(variables, x), ref), 1e-5)
    # A head with norm_last_layer refuses a trained g.
    frozen = models.DINOHead(100, hidden_dim=48, bottleneck_dim=16)
    with self.assertRaisesRegex(interop.InteropError, 'weight_g'):
      interop.from_pytorch(torch_state(head_t), frozen)

  def test_export_then_import_is_exact(self):
    exported = interop.to_pytorch(self.variables, self.model)
    self.assertEqual(set(exported), set(self.torch_vit.state_dict()))
    for key, value in self.torch_vit.state_dict().items():
      np.testing.assert_array_equal(exported[key], value.numpy(), key)
    again = interop.from_pytorch(exported, self.model)
    jax.tree.map(np.testing.assert_array_equal, again, self.variables)
    # Torch loads our export strictly.
    clone = torch_dino.ViT()
    clone.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})


class KeysTest(absltest.TestCase):
  def test_vit_small_has_150_official_keys(self):
    model = models.vit_small()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    exported = interop.to_pytorch(variables, model)
    self.assertLen(exported, 150)
    self.assertEqual(
      exported['patch_embed.proj.weight'].shape, (384, 3, 16, 16)
    )
    self.assertEqual(exported['blocks.11.attn.qkv.weight'].shape, (1152, 384))

  def test_head_export_keys(self):
    head = models.DINOHead(32, hidden_dim=24, bottleneck_dim=8)
    variables = head.init(jax.random.key(0), jnp.zeros((1, 16)))
    exported = interop.to_pytorch(variables, head)
    self.assertEqual(
      set(exported),
      {
        'mlp.0.weight',
        'mlp.0.bias',
        'mlp.2.weight',
        'mlp.2.bias',
        'mlp.4.weight',
        'mlp.4.bias',
        'last_layer.weight_g',
        'last_layer.weight_v',
      },
    )
    np.testing.assert_array_equal(
      exported['last_layer.weight_g'], np.ones((32, 1))
    )
    np.testing.assert_array_equal(
      exported['last_layer.weight_v'],
      np.asarray(variables['params']['last_layer']['weight_v']).T,
    )
    # Old-style weight_norm keys load back.
    again = interop.from_pytorch(exported, head)
    jax.tree.map(np.testing.assert_array_equal, again, variables)

  def test_training_checkpoint_prefixes_and_bad_keys(self):
    torch.manual_seed(2)
    vit = torch_dino.ViT()
    backbone = {f'module.backbone.{k}': v for k, v in vit.state_dict().items()}
    head = {'module.head.mlp.0.weight': torch.zeros(3)}
    ckpt = {
      'teacher': {
        **{k.replace('module.', ''): v for k, v in backbone.items()},
        'head.mlp.0.bias': torch.zeros(3),
      },
      'student': {**backbone, **head},
    }
    model = tiny_vit()
    from_teacher = interop.from_pytorch(ckpt, model)
    from_student = interop.from_pytorch(ckpt['student'], model)
    jax.tree.map(np.testing.assert_array_equal, from_teacher, from_student)
    state = torch_state(vit)
    broken = dict(state)
    del broken['norm.bias']
    broken['extra.weight'] = np.zeros(2)
    broken['cls_token'] = np.zeros((1, 1, 65))
    with self.assertRaises(interop.InteropError) as cm:
      interop.from_pytorch(broken, model)
    message = str(cm.exception)
    self.assertIn('missing (1): norm.bias', message)
    self.assertIn('unexpected (1): extra.weight', message)
    self.assertIn('cls_token: checkpoint (1, 1, 65)', message)

  def test_pth_files(self):
    torch.manual_seed(3)
    vit = torch_dino.ViT()
    directory = self.create_tempdir().full_path
    path = os.path.join(directory, 'backbone.pth')
    torch.save(vit.state_dict(), path)
    variables = interop.from_pytorch(path, tiny_vit())
    np.testing.assert_array_equal(
      variables['params']['cls_token'], vit.cls_token.detach().numpy()
    )
    full = os.path.join(directory, 'full.pth')
    torch.save(  # official full checkpoints pickle their argparse args
      {
        'teacher': vit.state_dict(),
        'args': argparse.Namespace(arch='vit_small'),
      },
      full,
    )
    variables = interop.from_pytorch(full, tiny_vit())
    np.testing.assert_array_equal(
      variables['params']['pos_embed'], vit.pos_embed.detach().numpy()
    )
    unsafe = os.path.join(directory, 'unsafe.pth')
    torch.save(
      {'teacher': vit.state_dict(), 'args': fractions.Fraction(1, 3)}, unsafe
    )
    with self.assertRaisesRegex(interop.InteropError, 'tensor-only'):
      interop.from_pytorch(unsafe, tiny_vit())


class CheckpointImportExportTest(absltest.TestCase):
  def test_full_checkpoint_round_trip(self):
    import tiny_config

    from dino_jax import workdir as workdir_lib

    config = tiny_config.get_config()
    config.steps_per_epoch = 5
    torch.manual_seed(4)
    nets = {}
    for name in ('student', 'teacher'):
      vit = torch_dino.ViT(patch=8, dim=32, depth=2, heads=2, img_size=32)
      head = torch_dino.Head(32, 64, hidden=64, bottleneck=16)
      with torch.no_grad():  # norm_last_layer: g = 1
        head.last_layer.parametrizations.weight.original0.fill_(1.0)
      nets[name] = (vit, head)
    prefix = {'student': 'module.', 'teacher': ''}
    ckpt = {
      name: {
        **{
          f'{prefix[name]}backbone.{k}': v for k, v in vit.state_dict().items()
        },
        **{f'{prefix[name]}head.{k}': v for k, v in head.state_dict().items()},
      }
      for name, (vit, head) in nets.items()
    }
    center = torch.randn(1, 64)
    ckpt.update(
      dino_loss={'center': center},
      epoch=3,
      args=argparse.Namespace(arch='vit_small'),
    )
    directory = self.create_tempdir().full_path
    path = os.path.join(directory, 'checkpoint.pth')
    torch.save(ckpt, path)
    workdir = os.path.join(directory, 'work')
    step = interop.import_checkpoint(path, workdir, config)
    self.assertEqual(step, 15)
    _, _, state, restored_step = workdir_lib.load_workdir(workdir)
    self.assertEqual(restored_step, 15)
    np.testing.assert_array_equal(state.center, center.numpy())
    np.testing.assert_array_equal(
      state.teacher['backbone']['cls_token'],
      nets['teacher'][0].cls_token.detach().numpy(),
    )
    np.testing.assert_array_equal(
      state.student['backbone']['pos_embed'],
      nets['student'][0].pos_embed.detach().numpy(),
    )
    self.assertEqual(int(state.opt_state.count), 15)  # schedules go on
    out = os.path.join(directory, 'export.pth')
    interop.export_checkpoint(workdir, out, what='full')
    exported = torch.load(out, weights_only=True)
    for name in ('student', 'teacher'):
      for key, value in ckpt[name].items():
        if 'parametrizations' in key:
          key = key.replace('parametrizations.weight.original0', 'weight_g')
          key = key.replace('parametrizations.weight.original1', 'weight_v')
        np.testing.assert_array_equal(
          exported[name][key].numpy(), value.numpy(), key
        )
    backbone = os.path.join(directory, 'backbone.pth')
    interop.export_checkpoint(workdir, backbone)
    released = torch.load(backbone, weights_only=True)
    clone = torch_dino.ViT(patch=8, dim=32, depth=2, heads=2, img_size=32)
    clone.load_state_dict(released)  # strict, like torch.hub


if __name__ == '__main__':
  absltest.main()
