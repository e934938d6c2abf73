"""BN-Inception (Ioffe & Szegedy 2015) in the Cadene `pretrainedmodels` layout, 1024-d.

The Cadene module is flat, so parameter names are its attribute names verbatim
(`inception_3a_double_3x3_1_bn`), which convert.py maps one to one. Convs have biases;
BN eps is 1e-5. `global_pool`/`last_linear` are not built (the head replaces them).

Input convention of the `bn_inception-52deb4733` weights (converted from Caffe):
BGR channel order, 0..255 range, minus the per-channel mean [104, 117, 128] (B, G, R),
no division by a std.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from xbm_jax.models import layers

BGR_MEAN = (104.0, 117.0, 128.0)

# name: (1x1, 3x3_reduce, 3x3, double_3x3_reduce, double_3x3, pool_proj, pool kind).
# 1x1 == 0 and pool_proj == 0 mark the stride-2 "reduction" blocks (3c, 4e), whose
# 3x3 and second double-3x3 convs have stride 2 and whose pool branch is a bare max pool.
BLOCKS = (
  ("3a", (64, 64, 64, 64, 96, 32, "avg")),
  ("3b", (64, 64, 96, 64, 96, 64, "avg")),
  ("3c", (0, 128, 160, 64, 96, 0, "max_s2")),
  ("4a", (224, 64, 96, 96, 128, 128, "avg")),
  ("4b", (192, 96, 128, 96, 128, 128, "avg")),
  ("4c", (160, 128, 160, 128, 160, 128, "avg")),
  ("4d", (96, 128, 192, 160, 192, 128, "avg")),
  ("4e", (0, 128, 192, 192, 256, 0, "max_s2")),
  ("5a", (352, 192, 320, 160, 224, 128, "avg")),
  ("5b", (352, 192, 320, 192, 224, 128, "max")),
)


class BNInception(nn.Module):
  """BN-Inception backbone.

  Call: `images [B, H, W, 1|3]` uint8/float 0..255 RGB -> feature map
  `[B, ~H/32, ~W/32, 1024]` in `dtype` (7x7 at 224).
  """

  frozen_bn: bool = False
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    conv = layers.conv(dtype=self.dtype, use_bias=True)
    norm = layers.batch_norm(
      train=train, frozen=self.frozen_bn, axis_name=self.bn_axis_name, dtype=self.dtype
    )

    def cbr(x, name, features, kernel, stride=1):
      """Cadene's conv `name` -> BN `name_bn` -> ReLU ('same' padding for 3x3/7x7)."""
      p = kernel // 2
      x = conv(features, (kernel, kernel), strides=stride, padding=((p, p), (p, p)), name=name)(x)
      return nn.relu(norm(name=name + "_bn")(x))

    rgb = layers.to_rgb(images)
    x = (rgb[..., ::-1] - jnp.asarray(BGR_MEAN)).astype(self.dtype)
    x = cbr(x, "conv1_7x7_s2", 64, 7, 2)
    x = layers.max_pool(x, 3, 2, ceil_mode=True)
    x = cbr(x, "conv2_3x3_reduce", 64, 1)
    x = cbr(x, "conv2_3x3", 192, 3)
    x = layers.max_pool(x, 3, 2, ceil_mode=True)
    for block, (c1, c3r, c3, cdr, cd, cp, pool) in BLOCKS:
      n = f"inception_{block}_"
      stride = 2 if pool == "max_s2" else 1
      branches = []
      if c1:
        branches.append(cbr(x, n + "1x1", c1, 1))
      branches.append(cbr(cbr(x, n + "3x3_reduce", c3r, 1), n + "3x3", c3, 3, stride))
      d = cbr(x, n + "double_3x3_reduce", cdr, 1)
      d = cbr(d, n + "double_3x3_1", cd, 3)
      branches.append(cbr(d, n + "double_3x3_2", cd, 3, stride))
      if pool == "max_s2":
        branches.append(layers.max_pool(x, 3, 2, ceil_mode=True))
      else:
        pooled = (
          layers.avg_pool_same(x) if pool == "avg" else layers.max_pool(x, 3, 1, 1, ceil_mode=True)
        )
        branches.append(cbr(pooled, n + "pool_proj", cp, 1))
      x = layers.concat(branches)
    return x
