"""The embedding head: global pooling -> Dense(embed_dim) -> L2 normalisation.

As in the XBM reference: global **max** pooling by default, a Linear layer initialised with
torch `kaiming_normal_(mode="fan_out")` (on a `[out, in]` weight: std = sqrt(2 / out)) and a
zero bias, then unit rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from xbm_jax.embeddings import l2_normalize

POOLS = ("max", "avg", "gem")
GEM_P = 3.0  # Radenovic et al.'s GeM exponent (fixed, not learned)
GEM_EPS = 1e-6


def global_pool(x: jax.Array, kind: str = "max") -> jax.Array:
  """`[B, H, W, C]` -> `[B, C]` float32 by max, average, or GeM (p = 3) pooling."""
  if x.ndim != 4:
    raise ValueError(f"global_pool wants a [B, H, W, C] feature map; got {tuple(x.shape)}")
  x = x.astype(jnp.float32)
  if kind == "max":
    return jnp.max(x, axis=(1, 2))
  if kind == "avg":
    return jnp.mean(x, axis=(1, 2))
  if kind == "gem":
    return jnp.mean(jnp.maximum(x, GEM_EPS) ** GEM_P, axis=(1, 2)) ** (1.0 / GEM_P)
  raise ValueError(f"unknown pool {kind!r}; valid: {', '.join(POOLS)}")


def fan_out_normal(embed_dim: int):
  """torch kaiming_normal_(mode='fan_out') on Linear weight [out, in]: N(0, 2 / out)."""
  return nn.initializers.normal(stddev=(2.0 / embed_dim) ** 0.5)


class EmbeddingHead(nn.Module):
  """Pool, project, normalise.

  Attributes:
    embed_dim: output dimension D.
    pool: "max" (paper), "avg" or "gem".
  Input `[B, H, W, C]` feature map (any float dtype); output `[B, D]` float32 unit rows.
  `project` is the part after the pooling: `[N, C]` pooled features -> `[N, D]` unit rows,
  so that stored pooled features can be re-embedded by the current head
  (`xbm_jax.freshness.reprojection`).
  """

  embed_dim: int
  pool: str = "max"

  def setup(self):
    self.fc = nn.Dense(
      self.embed_dim,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      kernel_init=fan_out_normal(self.embed_dim),
      bias_init=nn.initializers.zeros,
    )

  def __call__(self, feature_map: jax.Array) -> jax.Array:
    return self.project(global_pool(feature_map, self.pool))

  def project(self, pooled: jax.Array) -> jax.Array:
    """`[N, C]` pooled features (any float dtype) -> `[N, D]` float32 unit rows."""
    return l2_normalize(self.fc(pooled))
