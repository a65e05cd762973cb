"""A PyTorch DINO train step written from SPEC §3-§4, for benchmarks only.

The reference side of ``benchmarks/train_step.py``: the same work as one
dino_jax step (student on all crops, grouped by resolution; teacher on the two
global crops; the 2V - 2 pair loss; backward; per-tensor clipping; AdamW with
no decay on biases and 1-D tensors; teacher EMA; center update). The ViT and
head are the ones the parity tests check against dino_jax
(``tests/torch_dino.py``). To time the official code instead, pass
``--official_repo`` to ``train_step.py``.
"""

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'tests')
)
import torch_dino  # noqa: E402


class MultiCrop(nn.Module):
  """Backbone on each resolution group, head on all CLS features."""

  def __init__(self, backbone, head):
    super().__init__()
    self.backbone, self.head = backbone, head

  def forward(self, crops):
    feats = [self.backbone(torch.cat(group)) for group in crops]
    return self.head(torch.cat(feats))


def build(arch: dict, out_dim: int, official_repo: str | None = None):
  """(student, teacher) MultiCrop modules with equal weights."""
  if official_repo:
    sys.path.insert(0, official_repo)
    import vision_transformer as vits  # the official module, not vendored

    def make():
      vit = vits.__dict__[arch['name']](patch_size=arch['patch'])
      head = vits.DINOHead(vit.embed_dim, out_dim)
      return MultiCrop(vit, head)
  else:

    def make():
      vit = torch_dino.ViT(
        patch=arch['patch'],
        dim=arch['dim'],
        depth=arch['depth'],
        heads=arch['heads'],
      )
      head = torch_dino.Head(arch['dim'], out_dim, hidden=2048, bottleneck=256)
      g = head.last_layer.parametrizations.weight.original0
      g.requires_grad = False  # norm_last_layer: g fixed at 1
      return MultiCrop(vit, head)

  student, teacher = make(), make()
  teacher.load_state_dict(student.state_dict())
  for p in teacher.parameters():
    p.requires_grad = False
  return student, teacher


def dino_loss(student_out, teacher_out, center, n_crops, teacher_temp):
  s = (student_out / 0.1).chunk(n_crops)
  t = F.softmax((teacher_out - center) / teacher_temp, dim=-1).chunk(2)
  total, terms = 0.0, 0
  for iq, q in enumerate(t):
    for v in range(n_crops):
      if v == iq:
        continue
      total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), -1).mean()
      terms += 1
  return total / terms


class Step:
  """One DINO iteration; ``__call__(global_crops, local_crops) -> loss``."""

  def __init__(self, student, teacher, out_dim, amp: bool, device):
    self.student, self.teacher = student.to(device), teacher.to(device)
    decay, no_decay = [], []
    for name, p in student.named_parameters():
      if not p.requires_grad:
        continue
      (no_decay if name.endswith('.bias') or p.ndim == 1 else decay).append(p)
    self.opt = torch.optim.AdamW(
      [{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}],
      lr=5e-4,
      weight_decay=0.04,
    )
    self.center = torch.zeros(1, out_dim, device=device)
    self.amp = amp
    self.device = device
    self.scaler = torch.amp.GradScaler('cuda') if amp else None
    self.pairs = [
      (ps, pt)
      for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True)
    ]

  def __call__(self, global_crops, local_crops):
    n_crops = len(global_crops) + len(local_crops)
    groups = [global_crops] + ([local_crops] if len(local_crops) else [])
    with torch.autocast(
      self.device.type, dtype=torch.float16, enabled=self.amp
    ):
      with torch.no_grad():
        teacher_out = self.teacher([global_crops])
      student_out = self.student(groups)
      loss = dino_loss(
        student_out.float(), teacher_out.float(), self.center, n_crops, 0.04
      )
    self.opt.zero_grad(set_to_none=True)
    if self.scaler is not None:
      self.scaler.scale(loss).backward()
      self.scaler.unscale_(self.opt)
    else:
      loss.backward()
    for p in self.student.parameters():  # per-tensor clipping at 3.0
      if p.grad is not None:
        coef = 3.0 / (p.grad.detach().norm(2) + 1e-6)
        p.grad.detach().mul_(torch.clamp(coef, max=1.0))
    if self.scaler is not None:
      self.scaler.step(self.opt)
      self.scaler.update()
    else:
      self.opt.step()
    with torch.no_grad():
      m = 0.996
      ps = [p.detach() for p, _ in self.pairs]
      pt = [t for _, t in self.pairs]
      torch._foreach_mul_(pt, m)
      torch._foreach_add_(pt, ps, alpha=1 - m)
      batch_center = teacher_out.float().mean(0, keepdim=True)
      self.center.mul_(0.9).add_(batch_center, alpha=0.1)
    return loss.detach()
