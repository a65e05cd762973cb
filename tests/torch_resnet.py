"""A torch.nn ResNet written from torchvision's public definition.

torchvision is not importable beside the CPU torch installed here, so the
tests (tests/test_resnet.py), the lockstep (benchmarks/lockstep.py) and the
convergence harness (benchmarks/convergence.py) use this one: torchvision's
``BasicBlock`` / ``Bottleneck`` (v1.5: the stride on the 3x3 conv), stem
7x7/2 pad 3, max-pool 3x3/2 pad 1, a 1x1 conv + BatchNorm downsample where
the shape changes, kaiming normal (fan_out, relu) convs, BatchNorm scale 1
and bias 0. ``width`` (torchvision: 64) narrows every stage for tests.
"""

import torch
from torch import nn


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    idt = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.relu(y + idt)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    idt = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + idt)


class ResNet(nn.Module):
  """torchvision's ResNet: ``forward`` is ``fc`` on the pooled features.

  ``features(x)`` gives the pooled features without ``fc``; the official
  ``MultiCropWrapper`` sets ``fc = Identity`` so ``forward`` gives them too.
  """

  def __init__(self, block, layers, num_classes=1000, width=64):
    super().__init__()
    self.inplanes = width
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.layer1 = self._make(block, width, layers[0], 1)
    self.layer2 = self._make(block, 2 * width, layers[1], 2)
    self.layer3 = self._make(block, 4 * width, layers[2], 2)
    self.layer4 = self._make(block, 8 * width, layers[3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(8 * width * block.expansion, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def _make(self, block, planes, blocks, stride):
    down = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      down = nn.Sequential(
        nn.Conv2d(
          self.inplanes, planes * block.expansion, 1, stride, bias=False
        ),
        nn.BatchNorm2d(planes * block.expansion),
      )
    mods = [block(self.inplanes, planes, stride, down)]
    self.inplanes = planes * block.expansion
    mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*mods)

  def features(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)

  def forward(self, x):
    return self.fc(self.features(x))


ARCHS = {
  'resnet18': (BasicBlock, [2, 2, 2, 2]),
  'resnet34': (BasicBlock, [3, 4, 6, 3]),
  'resnet50': (Bottleneck, [3, 4, 6, 3]),
}


def resnet(arch: str, width: int = 64, num_classes: int = 1000) -> ResNet:
  """torchvision's ``models.__dict__[arch]()`` narrowed to ``width``."""
  if arch not in ARCHS:
    raise ValueError(f'arch={arch!r}: use one of {", ".join(ARCHS)}')
  block, layers = ARCHS[arch]
  return ResNet(block, layers, num_classes=num_classes, width=width)
