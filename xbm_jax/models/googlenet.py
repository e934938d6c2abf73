"""GoogLeNet (Inception v1) in the torchvision layout, 1024-d features.

Module names mirror torchvision's state_dict keys (`inception3a.branch2.1.bn` ->
`inception3a/branch2_1/bn`). The auxiliary classifiers (aux1/aux2) and `fc` are not built;
convert.py skips them. As in torchvision, "branch3" uses a 3x3 conv (not the paper's 5x5).

Input convention: torchvision's pretrained GoogLeNet uses `transform_input=True`, which
maps ImageNet-normalised input back to `(x / 255 - 0.5) / 0.5`; we apply that directly.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from xbm_jax.models import layers

# name: (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj)
INCEPTIONS = (
  ("inception3a", (64, 96, 128, 16, 32, 32)),
  ("inception3b", (128, 128, 192, 32, 96, 64)),
  ("maxpool3", None),
  ("inception4a", (192, 96, 208, 16, 48, 64)),
  ("inception4b", (160, 112, 224, 24, 64, 64)),
  ("inception4c", (128, 128, 256, 24, 64, 64)),
  ("inception4d", (112, 144, 288, 32, 64, 64)),
  ("inception4e", (256, 160, 320, 32, 128, 128)),
  ("maxpool4", None),
  ("inception5a", (256, 160, 320, 32, 128, 128)),
  ("inception5b", (384, 192, 384, 48, 128, 128)),
)


class BasicConv2d(nn.Module):
  """conv (no bias) -> BN (eps 1e-3) -> ReLU."""

  features: int
  kernel: int
  conv: Callable
  norm: Callable
  stride: int = 1
  padding: int = 0

  @nn.compact
  def __call__(self, x):
    p = self.padding
    x = self.conv(
      self.features,
      (self.kernel, self.kernel),
      strides=self.stride,
      padding=((p, p), (p, p)),
      name="conv",
    )(x)
    return nn.relu(self.norm(name="bn")(x))


class Inception(nn.Module):
  """Four branches concatenated: 1x1 | 1x1-3x3 | 1x1-3x3 | maxpool-1x1."""

  channels: tuple
  conv: Callable
  norm: Callable

  @nn.compact
  def __call__(self, x):
    c1, c3r, c3, c5r, c5, cp = self.channels
    bc = lambda f, k, name, p=0: BasicConv2d(f, k, self.conv, self.norm, padding=p, name=name)
    b1 = bc(c1, 1, "branch1")(x)
    b2 = bc(c3, 3, "branch2_1", 1)(bc(c3r, 1, "branch2_0")(x))
    b3 = bc(c5, 3, "branch3_1", 1)(bc(c5r, 1, "branch3_0")(x))
    b4 = bc(cp, 1, "branch4_1")(layers.max_pool(x, 3, 1, 1, ceil_mode=True))
    return layers.concat([b1, b2, b3, b4])


class GoogLeNet(nn.Module):
  """GoogLeNet backbone.

  Call: `images [B, H, W, 1|3]` uint8/float 0..255 RGB -> feature map
  `[B, ceil(H/32), ceil(W/32), 1024]` in `dtype`.
  """

  frozen_bn: bool = False
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    conv = layers.conv(dtype=self.dtype)
    norm = layers.batch_norm(
      train=train,
      frozen=self.frozen_bn,
      axis_name=self.bn_axis_name,
      dtype=self.dtype,
      epsilon=1e-3,
    )
    # transform_input=True: ImageNet-normalised input re-mapped to (x - 0.5) / 0.5.
    x = ((layers.to_rgb(images) / 255.0 - 0.5) / 0.5).astype(self.dtype)
    x = BasicConv2d(64, 7, conv, norm, stride=2, padding=3, name="conv1")(x)
    x = layers.max_pool(x, 3, 2, ceil_mode=True)
    x = BasicConv2d(64, 1, conv, norm, name="conv2")(x)
    x = BasicConv2d(192, 3, conv, norm, padding=1, name="conv3")(x)
    x = layers.max_pool(x, 3, 2, ceil_mode=True)
    for name, channels in INCEPTIONS:
      if name == "maxpool3":
        x = layers.max_pool(x, 3, 2, ceil_mode=True)
      elif name == "maxpool4":
        x = layers.max_pool(x, 2, 2, ceil_mode=True)
      else:
        x = Inception(channels, conv, norm, name=name)(x)
    return x
