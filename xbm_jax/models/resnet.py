"""ResNet-18/34/50/101 in the torchvision layout (v1.5: stride in the 3x3 of a Bottleneck).

Module names mirror torchvision's state_dict keys with a numeric index folded into the name
before it (`layer1.0.downsample.1` -> `layer1_0/downsample_1`), which is all convert.py
needs to map a checkpoint.

XBM reference switches (defaults reproduce the reference, not torchvision):
  stem_relu=False   the reference stem is conv1 -> bn1 -> maxpool with NO ReLU (a quirk);
                    set True for the torchvision stem.
  layer4_stride=2   1 doubles the final feature map (a common retrieval trick).
  frozen_bn=False   True: BN always uses running stats and never updates them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from xbm_jax.models import layers

STAGES = {
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
}


class BasicBlock(nn.Module):
  """Two 3x3 convs; out channels = planes."""

  planes: int
  stride: int
  conv: Callable
  norm: Callable
  expansion = 1

  @nn.compact
  def __call__(self, x):
    out = self.conv(
      self.planes, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)), name="conv1"
    )(x)
    out = nn.relu(self.norm(name="bn1")(out))
    out = self.conv(self.planes, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(out)
    out = self.norm(name="bn2")(out)
    return nn.relu(out + _shortcut(self, x, self.planes * self.expansion))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1; out channels = 4 * planes."""

  planes: int
  stride: int
  conv: Callable
  norm: Callable
  expansion = 4

  @nn.compact
  def __call__(self, x):
    out = self.conv(self.planes, (1, 1), name="conv1")(x)
    out = nn.relu(self.norm(name="bn1")(out))
    out = self.conv(
      self.planes, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)), name="conv2"
    )(out)
    out = nn.relu(self.norm(name="bn2")(out))
    out = self.conv(self.planes * 4, (1, 1), name="conv3")(out)
    out = self.norm(name="bn3")(out)
    return nn.relu(out + _shortcut(self, x, self.planes * self.expansion))


def _shortcut(block, x, out_channels):
  """Identity, or torchvision's `downsample` (1x1 strided conv + BN) when shapes change."""
  if block.stride == 1 and x.shape[-1] == out_channels:
    return x
  y = block.conv(out_channels, (1, 1), strides=block.stride, name="downsample_0")(x)
  return block.norm(name="downsample_1")(y)


class ResNet(nn.Module):
  """ResNet backbone.

  Call: `images [B, H, W, 1|3]` uint8/float 0..255 RGB -> feature map
  `[B, H/32, W/32, 512 * expansion]` (H/16 with layer4_stride=1) in `dtype`.
  Images are normalised with the ImageNet mean/std (torchvision weights).
  """

  depth: int = 50
  stem_relu: bool = False
  layer4_stride: int = 2
  frozen_bn: bool = False
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    if self.depth not in STAGES:
      raise ValueError(f"unsupported ResNet depth {self.depth}; valid: {sorted(STAGES)}")
    if self.layer4_stride not in (1, 2):
      raise ValueError(f"layer4_stride must be 1 or 2; got {self.layer4_stride}")
    kind, blocks = STAGES[self.depth]
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    conv = layers.conv(dtype=self.dtype)
    norm = layers.batch_norm(
      train=train, frozen=self.frozen_bn, axis_name=self.bn_axis_name, dtype=self.dtype
    )

    x = layers.imagenet_normalize(images).astype(self.dtype)
    x = conv(64, (7, 7), strides=2, padding=((3, 3), (3, 3)), name="conv1")(x)
    x = norm(name="bn1")(x)
    if self.stem_relu:
      x = nn.relu(x)
    x = layers.max_pool(x, 3, 2, 1)
    for i, (n_blocks, planes) in enumerate(zip(blocks, (64, 128, 256, 512))):
      stage_stride = (1, 2, 2, self.layer4_stride)[i]
      for j in range(n_blocks):
        x = block_cls(
          planes=planes,
          stride=stage_stride if j == 0 else 1,
          conv=conv,
          norm=norm,
          name=f"layer{i + 1}_{j}",
        )(x)
    return x
