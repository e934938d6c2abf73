"""Building blocks shared by the backbones: input conventions, conv/BN factories, pooling.

Every backbone takes images `[B, H, W, C]` (uint8 or float, values in 0..255, RGB, or
C = 1 grayscale) and normalises them itself, so the data pipeline never needs to know
which pretrained weights a model came from.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

# torchvision ImageNet statistics (RGB, on 0..1 inputs).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu"): plain (untruncated)
# normal with std sqrt(2 / fan_out); for an HWIO kernel fan_out = kh * kw * out, as in torch.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def check_images(images: jax.Array, name: str = "images") -> None:
  """Raises a clear error for anything that is not `[B, H, W, C]` images."""
  if images.ndim != 4:
    raise ValueError(f"{name} must be NHWC [B, H, W, C]; got shape {tuple(images.shape)}")
  if not (jnp.issubdtype(images.dtype, jnp.integer) or jnp.issubdtype(images.dtype, jnp.floating)):
    raise TypeError(f"{name} must be uint8 or float (0..255); got dtype {images.dtype}")


def to_rgb(images: jax.Array) -> jax.Array:
  """`[B, H, W, 1|3]` uint8/float 0..255 -> `[B, H, W, 3]` float32 0..255 (gray tiled)."""
  check_images(images)
  channels = images.shape[-1]
  if channels not in (1, 3):
    raise ValueError(
      "ImageNet backbones take RGB (C=3) or grayscale (C=1) images; got "
      f"shape {tuple(images.shape)}"
    )
  x = images.astype(jnp.float32)
  if channels == 1:
    x = jnp.tile(x, (1, 1, 1, 3))
  return x


def imagenet_normalize(images: jax.Array) -> jax.Array:
  """0..255 RGB/gray -> torchvision normalisation `(x / 255 - mean) / std`, float32."""
  x = to_rgb(images) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def conv(*, dtype: Any, use_bias: bool = False):
  """An nn.Conv factory with torch's init, float32 params and `dtype` compute."""
  return functools.partial(
    nn.Conv, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=kaiming_fan_out
  )


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d semantics on NHWC (channels last).

  Train mode normalises with the batch mean and *biased* variance (as flax's
  nn.BatchNorm and torch do) but, like torch and unlike flax, updates the running
  variance with the *unbiased* one, `var * n / (n - 1)` (n = values per channel
  over the whole batch, all devices of `axis_name` included): the running
  statistics then match a torch run of the same weights, so eval-mode outputs do.
  Params `scale`/`bias` and statistics `mean`/`var` keep flax's names, so
  converted torchvision checkpoints load unchanged. Statistics and the
  normalisation are computed in float32 whatever `dtype` (the output's).
  """

  use_running_average: bool
  momentum: float = 0.9  # flax convention: torch momentum 0.1
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    feat = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (feat,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (feat,), jnp.float32)
    scale = self.param("scale", nn.initializers.ones, (feat,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (feat,), self.param_dtype)
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean, mean2 = jnp.mean(xf, axes), jnp.mean(jnp.square(xf), axes)
      n = math.prod(x.shape[:-1])
      if self.axis_name is not None:
        mean, mean2 = jax.lax.pmean((mean, mean2), self.axis_name)
        n = n * jax.lax.psum(1, self.axis_name)
      var = jnp.maximum(mean2 - jnp.square(mean), 0.0)
      if not self.is_initializing():
        unbiased = var * (n / jnp.maximum(n - 1, 1))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
        ra_var.value = m * ra_var.value + (1.0 - m) * unbiased
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)


def batch_norm(
  *, train: bool, frozen: bool, axis_name: Optional[str], dtype: Any, epsilon: float = 1e-5
):
  """A `BatchNorm` factory (torch BatchNorm2d, momentum 0.1 -> 0.9 here).

  Running statistics are used (and never updated) in eval mode and when `frozen`.
  `axis_name` averages batch statistics over a mapped axis (e.g. "data" in shard_map).
  """
  use_running = (not train) or frozen
  return functools.partial(
    BatchNorm,
    use_running_average=use_running,
    momentum=0.9,
    epsilon=epsilon,
    dtype=dtype,
    param_dtype=jnp.float32,
    axis_name=None if use_running else axis_name,
  )


def max_pool(
  x: jax.Array, window: int, stride: int, padding: int = 0, *, ceil_mode: bool = False
) -> jax.Array:
  """torch.nn.MaxPool2d on NHWC, including `ceil_mode` (padding is -inf).

  With ceil_mode the output size is ceil((H + 2p - k) / s) + 1, minus one when the last
  window would start in the right padding (torch's rule); we get it by padding the right
  edge with enough -inf.
  """
  pads = []
  for size in x.shape[1:3]:
    if ceil_mode:
      out = math.ceil((size + 2 * padding - window) / stride) + 1
      if (out - 1) * stride >= size + padding:
        out -= 1
    else:
      out = (size + 2 * padding - window) // stride + 1
    right = max((out - 1) * stride + window - size - padding, 0)
    pads.append((padding, right))
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


def avg_pool_same(x: jax.Array) -> jax.Array:
  """torch AvgPool2d(3, stride=1, padding=1, count_include_pad=True) on NHWC."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)


def concat(xs: Sequence[jax.Array]) -> jax.Array:
  """Channel concatenation (torch.cat(dim=1) on NCHW)."""
  return jnp.concatenate(xs, axis=-1)
