"""A tiny CNN for CPU tests and the offline glyph demo (no pretrained weights).

Four conv3x3-BN-ReLU blocks (width, width, 2*width, 4*width) with 2x2 max pools after
the second and third: a 32x32 input gives an 8x8 map. Any channel count is accepted
(1-channel glyphs included); images 0..255 are scaled to [-1, 1].
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from xbm_jax.models import layers


class SmallCNN(nn.Module):
  """Call: `images [B, H, W, C]` uint8/float 0..255 -> `[B, H/4, W/4, 4 * width]`."""

  width: int = 32
  frozen_bn: bool = False
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    layers.check_images(images)
    if self.width < 1:
      raise ValueError(f"small_cnn width must be >= 1; got {self.width}")
    conv = layers.conv(dtype=self.dtype)
    norm = layers.batch_norm(
      train=train, frozen=self.frozen_bn, axis_name=self.bn_axis_name, dtype=self.dtype
    )
    x = (images.astype(jnp.float32) / 127.5 - 1.0).astype(self.dtype)
    for i, mult in enumerate((1, 1, 2, 4)):
      x = conv(self.width * mult, (3, 3), padding=((1, 1), (1, 1)), name=f"conv{i}")(x)
      x = nn.relu(norm(name=f"bn{i}")(x))
      if i in (1, 2):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return x
