"""Compact PyTorch definitions of the reference architectures (test oracles only).

torchvision is not a dependency, so these follow the torchvision ResNet / GoogLeNet and
Cadene BN-Inception layouts closely enough that `state_dict()` has the real checkpoints'
key names and shapes. `features(x)` returns the last feature map (NCHW) before the
classifier; `x` is what the original model takes (normalised NCHW float).
"""

import torch
from torch import nn

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inp, planes, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(inp, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    idt = x if self.downsample is None else self.downsample(x)
    return self.relu(out + idt)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inp, planes, stride, downsample):
    super().__init__()
    self.conv1 = nn.Conv2d(inp, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    idt = x if self.downsample is None else self.downsample(x)
    return self.relu(out + idt)


class ResNet(nn.Module):
  """torchvision ResNet; stem_relu=False gives the XBM reference stem (no ReLU)."""

  def __init__(self, block, layers, stem_relu=True, layer4_stride=2):
    super().__init__()
    self.stem_relu = stem_relu
    self.inp = 64
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    strides = (1, 2, 2, layer4_stride)
    for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
      setattr(self, f"layer{i + 1}", self._make_layer(block, planes, n, strides[i]))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(512 * block.expansion, 1000)

  def _make_layer(self, block, planes, n, stride):
    down = None
    if stride != 1 or self.inp != planes * block.expansion:
      down = nn.Sequential(
        nn.Conv2d(self.inp, planes * block.expansion, 1, stride, bias=False),
        nn.BatchNorm2d(planes * block.expansion),
      )
    blocks = [block(self.inp, planes, stride, down)]
    self.inp = planes * block.expansion
    blocks += [block(self.inp, planes, 1, None) for _ in range(1, n)]
    return nn.Sequential(*blocks)

  def features(self, x):
    x = self.bn1(self.conv1(x))
    if self.stem_relu:
      x = self.relu(x)
    x = self.maxpool(x)
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet18(**kw):
  return ResNet(BasicBlock, (2, 2, 2, 2), **kw)


def resnet50(**kw):
  return ResNet(Bottleneck, (3, 4, 6, 3), **kw)


# -------------------------------------------------------------------------- GoogLeNet
class BasicConv2d(nn.Module):
  def __init__(self, inp, out, **kw):
    super().__init__()
    self.conv = nn.Conv2d(inp, out, bias=False, **kw)
    self.bn = nn.BatchNorm2d(out, eps=0.001)

  def forward(self, x):
    return torch.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
  def __init__(self, inp, c1, c3r, c3, c5r, c5, cp):
    super().__init__()
    self.branch1 = BasicConv2d(inp, c1, kernel_size=1)
    self.branch2 = nn.Sequential(
      BasicConv2d(inp, c3r, kernel_size=1), BasicConv2d(c3r, c3, kernel_size=3, padding=1)
    )
    self.branch3 = nn.Sequential(
      BasicConv2d(inp, c5r, kernel_size=1), BasicConv2d(c5r, c5, kernel_size=3, padding=1)
    )
    self.branch4 = nn.Sequential(
      nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True), BasicConv2d(inp, cp, kernel_size=1)
    )

  def forward(self, x):
    return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
  def __init__(self, inp):
    super().__init__()
    self.conv = BasicConv2d(inp, 128, kernel_size=1)
    self.fc1 = nn.Linear(2048, 1024)
    self.fc2 = nn.Linear(1024, 1000)


class GoogLeNet(nn.Module):
  """torchvision GoogLeNet with transform_input=True and (unused) aux classifiers."""

  def __init__(self):
    super().__init__()
    self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
    self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    self.conv2 = BasicConv2d(64, 64, kernel_size=1)
    self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
    self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
    self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
    self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
    self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
    self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
    self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
    self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
    self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
    self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
    self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
    self.aux1 = InceptionAux(512)
    self.aux2 = InceptionAux(528)
    self.fc = nn.Linear(1024, 1000)

  def features(self, x):
    # torchvision _transform_input: ImageNet-normalised -> (x - 0.5) / 0.5 per channel.
    x = torch.cat(
      [
        x[:, i : i + 1] * (s / 0.5) + (m - 0.5) / 0.5
        for i, (m, s) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
      ],
      1,
    )
    x = self.maxpool1(self.conv1(x))
    x = self.maxpool2(self.conv3(self.conv2(x)))
    x = self.maxpool3(self.inception3b(self.inception3a(x)))
    for name in ("4a", "4b", "4c", "4d", "4e"):
      x = getattr(self, "inception" + name)(x)
    x = self.maxpool4(x)
    return self.inception5b(self.inception5a(x))


# ------------------------------------------------------------------------ BN-Inception
# (1x1, 3x3_reduce, 3x3, double_reduce, double, pool_proj, pool); 0 = branch absent.
_BN_INC = (
  ("3a", 64, 64, 64, 64, 96, 32, "avg"),
  ("3b", 64, 64, 96, 64, 96, 64, "avg"),
  ("3c", 0, 128, 160, 64, 96, 0, "max2"),
  ("4a", 224, 64, 96, 96, 128, 128, "avg"),
  ("4b", 192, 96, 128, 96, 128, 128, "avg"),
  ("4c", 160, 128, 160, 128, 160, 128, "avg"),
  ("4d", 96, 128, 192, 160, 192, 128, "avg"),
  ("4e", 0, 128, 192, 192, 256, 0, "max2"),
  ("5a", 352, 192, 320, 160, 224, 128, "avg"),
  ("5b", 352, 192, 320, 192, 224, 128, "max"),
)


class BNInception(nn.Module):
  """Cadene pretrainedmodels BNInception: flat attribute names, convs with bias."""

  def __init__(self):
    super().__init__()
    self._cbr = []
    self._add("conv1_7x7_s2", 3, 64, 7, 2)
    self._add("conv2_3x3_reduce", 64, 64, 1)
    self._add("conv2_3x3", 64, 192, 3)
    inp = 192
    for b, c1, c3r, c3, cdr, cd, cp, pool in _BN_INC:
      n, s = f"inception_{b}_", 2 if pool == "max2" else 1
      if c1:
        self._add(n + "1x1", inp, c1, 1)
      self._add(n + "3x3_reduce", inp, c3r, 1)
      self._add(n + "3x3", c3r, c3, 3, s)
      self._add(n + "double_3x3_reduce", inp, cdr, 1)
      self._add(n + "double_3x3_1", cdr, cd, 3)
      self._add(n + "double_3x3_2", cd, cd, 3, s)
      if pool == "avg":
        setattr(
          self,
          n + "pool",
          nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True, count_include_pad=True),
        )
      elif pool == "max":
        setattr(self, n + "pool", nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True))
      else:
        setattr(self, n + "pool", nn.MaxPool2d(3, stride=2, ceil_mode=True))
      if cp:
        self._add(n + "pool_proj", inp, cp, 1)
      inp = c1 + c3 + cd + (cp if cp else inp)
    self.pool1_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    self.pool2_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    self.last_linear = nn.Linear(1024, 1000)

  def _add(self, name, inp, out, k, stride=1):
    setattr(self, name, nn.Conv2d(inp, out, k, stride, k // 2))
    setattr(self, name + "_bn", nn.BatchNorm2d(out, affine=True))

  def _run(self, name, x):
    return torch.relu(getattr(self, name + "_bn")(getattr(self, name)(x)))

  def features(self, x):
    x = self.pool1_3x3_s2(self._run("conv1_7x7_s2", x))
    x = self.pool2_3x3_s2(self._run("conv2_3x3", self._run("conv2_3x3_reduce", x)))
    for b, c1, _, _, _, _, cp, _ in _BN_INC:
      n = f"inception_{b}_"
      outs = [self._run(n + "1x1", x)] if c1 else []
      outs.append(self._run(n + "3x3", self._run(n + "3x3_reduce", x)))
      d = self._run(n + "double_3x3_1", self._run(n + "double_3x3_reduce", x))
      outs.append(self._run(n + "double_3x3_2", d))
      p = getattr(self, n + "pool")(x)
      outs.append(self._run(n + "pool_proj", p) if cp else p)
      x = torch.cat(outs, 1)
    return x


def randomize_bn(model, batches, seed=0, gamma=(0.5, 1.5)):
  """Non-trivial BN: random affine, running stats measured on random data (so they
  actually normalise and activations stay O(1) through a deep random net)."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.momentum = None  # cumulative average over the calibration batches
      m.reset_running_stats()
      with torch.no_grad():
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) * (gamma[1] - gamma[0]) + gamma[0])
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
  # Residual branches end in a small-gamma BN, as in trained ResNets: a random residual
  # stack otherwise amplifies float32 rounding ~1.4x per block (chaotic regime), and
  # two float32 implementations then drift apart by more than 1e-4.
  for m in model.modules():
    last_bn = (
      getattr(m, "bn3", None)
      if isinstance(m, Bottleneck)
      else (getattr(m, "bn2", None) if isinstance(m, BasicBlock) else None)
    )
    if last_bn is not None:
      with torch.no_grad():
        last_bn.weight.copy_(torch.rand(last_bn.weight.shape, generator=g) * 0.3 + 0.1)
  model.train()
  with torch.no_grad():
    for x in batches:
      model.features(x)
  model.eval()
  return model
