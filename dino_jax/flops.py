"""Analytic FLOPs of the DINO model and train step (for MFU).

XLA's cost analysis is exact on CPU but on GPU it does not count the
cuBLAS/cuDNN custom calls that run the matmuls (it reported 7.4 instead of
~115 GFLOPs per image for ViT-S/16). These counts come from the model sizes
alone, so they are the same on every backend.

Counted: every matmul as 2 * m * n * k (patch embedding, qkv, attention
logits Q K^T and the weighted sum A V over all T x T token pairs, output
projection, MLP, head MLP, last layer, the last layer's weight norm and the
loss's cross-entropy contraction). Not counted: elementwise work (softmax,
GELU, LayerNorm, the optimizer, EMA, center) and the on-device augmentation;
on XLA:CPU these add about 1 % for ViT-S/16 (tests/test_flops.py). Nor is
the recomputation of ``model.remat``: MFU counts the model's FLOPs, not the
hardware's (PaLM, Chowdhery et al. 2022, appendix B).

A backward pass costs twice the forward (one matmul for the input gradient
and one for the weight gradient), except where the input needs no gradient:
the patch embedding (images), the weight-norm sum (a constant) and the loss
(the teacher side).
"""

import ml_collections

from dino_jax import config as config_lib


def _matmul(m: int, k: int, n: int) -> int:
  """FLOPs of [m, k] x [k, n]: one multiply and one add per term."""
  return 2 * m * k * n


def vit_forward_flops(
  image_size: int,
  patch_size: int,
  embed_dim: int,
  depth: int,
  mlp_ratio: float = 4.0,
  channels: int = 3,
) -> dict[str, int]:
  """Forward FLOPs of one image through the ViT backbone.

  Args:
    image_size: side of the square crop in pixels.
    patch_size: p; border pixels that do not fill a patch are dropped.
    embed_dim: D.
    depth: number of blocks.
    mlp_ratio: MLP hidden width over D.
    channels: image channels.

  Returns:
    ``{'patch_embed': ..., 'blocks': ...}``: the patch projection and all
    blocks (T = 1 + (image_size // patch_size)^2 tokens each). The head count
    does not matter: Q K^T and A V cost T^2 D over all heads together.
  """
  grid = image_size // patch_size
  patches = grid * grid
  tokens = patches + 1
  d, hidden = embed_dim, int(embed_dim * mlp_ratio)
  block = (
    _matmul(tokens, d, 3 * d)  # qkv
    + _matmul(tokens, d, tokens)  # Q K^T, summed over heads
    + _matmul(tokens, tokens, d)  # A V
    + _matmul(tokens, d, d)  # proj
    + _matmul(tokens, d, hidden)  # fc1
    + _matmul(tokens, hidden, d)  # fc2
  )
  return {
    'patch_embed': _matmul(patches, patch_size * patch_size * channels, d),
    'blocks': depth * block,
  }


def head_forward_flops(
  in_dim: int,
  out_dim: int,
  hidden_dim: int = 2048,
  bottleneck_dim: int = 256,
  nlayers: int = 3,
) -> int:
  """Forward FLOPs of the DINO head for one row (one crop of one image).

  The MLP in_dim -> hidden (-> hidden) x (nlayers - 2) -> bottleneck, then
  the last layer bottleneck -> out_dim. The weight-norm column sums are per
  call, not per row: see ``train_step_flops``.
  """
  if nlayers == 1:
    mlp = _matmul(1, in_dim, bottleneck_dim)
  else:
    mlp = (
      _matmul(1, in_dim, hidden_dim)
      + (nlayers - 2) * _matmul(1, hidden_dim, hidden_dim)
      + _matmul(1, hidden_dim, bottleneck_dim)
    )
  return mlp + _matmul(1, bottleneck_dim, out_dim)


def train_step_flops(
  *,
  batch: int,
  global_size: int,
  local_size: int,
  local_number: int,
  patch_size: int,
  embed_dim: int,
  depth: int,
  out_dim: int,
  head_hidden_dim: int = 2048,
  head_bottleneck_dim: int = 256,
  head_nlayers: int = 3,
  mlp_ratio: float = 4.0,
  global_number: int = 2,
) -> dict[str, float]:
  """Matmul FLOPs of one DINO train step (``step.make_train_step``).

  The student runs forward and backward on all global_number + local_number
  crops; the teacher forward on the global crops only (SPEC §4.6).

  Args:
    batch: images in the step (global batch).
    global_size: global crop side.
    local_size: local crop side.
    local_number: local crops per image (L).
    patch_size, embed_dim, depth, mlp_ratio: the backbone.
    out_dim: K.
    head_hidden_dim, head_bottleneck_dim, head_nlayers: the head.
    global_number: global crops per image (2).

  Returns:
    ``global_crop_forward``, ``local_crop_forward`` (backbone + head for one
    crop of one image), ``student`` and ``teacher`` (per step), ``step``
    (their total with the loss) and ``per_image`` (``step / batch``).
  """
  head = head_forward_flops(
    embed_dim, out_dim, head_hidden_dim, head_bottleneck_dim, head_nlayers
  )
  vit = {
    size: vit_forward_flops(size, patch_size, embed_dim, depth, mlp_ratio)
    for size in (global_size, local_size)
  }
  crops = {global_size: 0, local_size: 0}
  crops[global_size] += global_number * batch
  crops[local_size] += local_number * batch
  # The weight norm's column sums of squares: one [1, bottleneck] x
  # [bottleneck, K] matmul per model call.
  weight_norm = _matmul(1, head_bottleneck_dim, out_dim)

  student = 2 * weight_norm  # forward, and the gradient to v only
  for size, n in crops.items():
    student += n * (
      2 * vit[size]['patch_embed']  # forward, weight gradient (no input's)
      + 3 * vit[size]['blocks']
      + 3 * head
    )
  teacher = weight_norm + global_number * batch * (
    vit[global_size]['patch_embed'] + vit[global_size]['blocks'] + head
  )
  # Cross-entropy of each teacher crop against each student crop (loss.py),
  # forward and the gradient to the student side.
  views = global_number + local_number
  loss = 2 * _matmul(global_number, batch * out_dim, views)
  total = student + teacher + loss
  return {
    'global_crop_forward': float(sum(vit[global_size].values()) + head),
    'local_crop_forward': float(sum(vit[local_size].values()) + head),
    'student': float(student),
    'teacher': float(teacher),
    'step': float(total),
    'per_image': total / batch,
  }


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - kernel) // stride + 1


def resnet_forward_flops(
  image_size: int, arch: str = 'resnet50', width: int = 64, channels: int = 3
) -> dict[str, int]:
  """Forward FLOPs of one square image through a ResNet without fc.

  Every conv as a matmul, 2 * (output pixels) * (k * k * C_in) * C_out, with
  torch's symmetric padding (models/resnet.py); BatchNorm, ReLU and the
  pools are not counted.

  Returns:
    ``{'stem': conv1, 'blocks': every other conv, downsamples included}``.
  """
  from dino_jax.models.resnet import ARCHS  # light import, no cycle

  net = ARCHS[arch](width=width)
  bottleneck = net.block == 'bottleneck'
  size = _conv_out(image_size, 7, 2, 3)
  stem = _matmul(size * size, 7 * 7 * channels, width)
  size = _conv_out(size, 3, 2, 1)  # max-pool
  inplanes, blocks = width, 0
  for i, n in enumerate(net.layers):
    planes = width * 2**i
    for j in range(n):
      stride = 2 if (i > 0 and j == 0) else 1
      out = _conv_out(size, 3, stride, 1)  # = a strided 1x1's output
      if bottleneck:
        outplanes = 4 * planes
        blocks += (
          _matmul(size * size, inplanes, planes)
          + _matmul(out * out, 9 * planes, planes)
          + _matmul(out * out, planes, outplanes)
        )
      else:
        outplanes = planes
        blocks += _matmul(out * out, 9 * inplanes, planes) + _matmul(
          out * out, 9 * planes, planes
        )
      if stride != 1 or inplanes != outplanes:
        blocks += _matmul(out * out, inplanes, outplanes)  # downsample
      inplanes, size = outplanes, out
  return {'stem': stem, 'blocks': blocks}


def resnet_train_step_flops(
  config: ml_collections.ConfigDict, batch: int | None = None
) -> dict[str, float]:
  """``train_step_flops`` for a ResNet config: the same terms, the stem in
  place of the patch embedding (its input, the images, needs no gradient:
  forward and weight gradient, twice the forward)."""
  m, c = config.model, config.crops
  batch = config.batch_size if batch is None else batch
  width = m.resnet_width
  features = 8 * width * (4 if m.arch == 'resnet50' else 1)
  head = head_forward_flops(
    features,
    m.out_dim,
    m.head_hidden_dim,
    m.head_bottleneck_dim,
    m.head_nlayers,
  )
  net = {
    size: resnet_forward_flops(size, m.arch, width)
    for size in (c.global_size, c.local_size)
  }
  weight_norm = _matmul(1, m.head_bottleneck_dim, m.out_dim)
  if not m.get('head_weight_norm', True):  # a plain last layer
    weight_norm = 0
  student = 2 * weight_norm
  crops = ((c.global_size, 2 * batch), (c.local_size, c.local_number * batch))
  for size, n in crops:
    # The stem: forward and weight gradient; the rest: forward and both.
    f = net[size]
    student += n * (2 * f['stem'] + 3 * f['blocks'] + 3 * head)
  teacher = weight_norm + 2 * batch * (
    net[c.global_size]['stem'] + net[c.global_size]['blocks'] + head
  )
  views = 2 + c.local_number
  loss = 2 * _matmul(2, batch * m.out_dim, views)
  total = student + teacher + loss
  return {
    'global_crop_forward': float(sum(net[c.global_size].values()) + head),
    'local_crop_forward': float(sum(net[c.local_size].values()) + head),
    'student': float(student),
    'teacher': float(teacher),
    'step': float(total),
    'per_image': total / batch,
  }


def from_config(
  config: ml_collections.ConfigDict, batch: int | None = None
) -> dict[str, float]:
  """``train_step_flops`` for a config (batch: ``config.batch_size``)."""
  if config.model.arch in config_lib.RESNET_ARCHS:
    return resnet_train_step_flops(config, batch)
  m, c = config.model, config.crops
  dims = config_lib.model_dims(config)
  return train_step_flops(
    batch=config.batch_size if batch is None else batch,
    global_size=c.global_size,
    local_size=c.local_size,
    local_number=c.local_number,
    patch_size=m.patch_size,
    embed_dim=dims['embed_dim'],
    depth=dims['depth'],
    out_dim=m.out_dim,
    head_hidden_dim=m.head_hidden_dim,
    head_bottleneck_dim=m.head_bottleneck_dim,
    head_nlayers=m.head_nlayers,
  )
