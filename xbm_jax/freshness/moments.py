"""Drift correction of the memory by moment matching (Adaptive Cross Batch Normalization).

The stored embeddings were computed by older parameters, so their distribution
lags the current batch's. Ajanthan et al. 2023 ("Adaptive Cross Batch
Normalization for Metric Learning", arXiv 2303.17127) model that drift as a
distribution shift and undo it per dimension, without any extra forward pass:

    M <- s_B * (M - m_M) / s_M + m_B,   then each row re-normalised to unit length,

where m_M, s_M are the per-dimension mean and standard deviation of the
memory's valid rows and m_B, s_B those of the current batch (or a smoothed
estimate of them, for small batches). This is the formula as stated above, per
dimension (diagonal moments), with population variances; the paper smooths the
batch moments with a Kalman filter, which is not implemented here: this module
offers the exponential moving average (`init` / `update`), the simple variant,
and any other estimate of the batch moments can be passed in instead.

    mean_b, var_b, _ = drift_correction.moments(batch.emb, valid_mask(batch))
    ema = drift_correction.update(ema, mean_b, var_b, decay=0.9)   # optional
    mem = drift_correction.match_moments(mem, ema.mean, ema.var)

Every function takes `axis_name` for rows split over a mesh axis inside
`jax.shard_map` (a sharded memory, a per-device batch): the moments are then
combined across the shards exactly, and every shard applies the same map.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from xbm_jax.embeddings import l2_normalize
from xbm_jax.memory import MemoryState


def _psum(x, axis_name: Optional[str]):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def moments(emb: jax.Array, valid: jax.Array, *, axis_name: Optional[str] = None):
  """Per-dimension mean and (population) variance of the valid rows.

  Two passes: the sums give the global mean, then the squared deviations are
  summed around that global mean, so the result is the same (up to float32
  rounding of a sum) whether the rows sit on one device or are split over
  `axis_name`; no `E[x^2] - E[x]^2` cancellation.

  Args:
    emb: `[N, D]` float rows (this shard's rows when `axis_name` is given).
    valid: `[N]` bool, the rows that count.
    axis_name: mesh axis the rows are split over (inside shard_map), or None.
  Returns:
    mean `[D]` float32, var `[D]` float32 (divided by the count, ddof=0), and
    count `[]` float32 (number of valid rows over all shards). With no valid
    row: mean and var are zeros and count is 0.
  """
  if emb.ndim != 2:
    raise ValueError(f"emb must be [N, D]; got shape {tuple(emb.shape)}")
  if valid.shape != emb.shape[:1] or valid.dtype != jnp.bool_:
    raise ValueError(
      f"valid must be [N]={emb.shape[:1]} bool to match emb; got {valid.dtype} {tuple(valid.shape)}"
    )
  x = emb.astype(jnp.float32)
  w = valid.astype(jnp.float32)[:, None]
  count = _psum(jnp.sum(valid, dtype=jnp.float32), axis_name)
  denominator = jnp.maximum(count, 1.0)  # an empty set: zeros, not NaN
  mean = _psum(jnp.sum(w * x, axis=0), axis_name) / denominator
  var = _psum(jnp.sum(w * jnp.square(x - mean), axis=0), axis_name) / denominator
  return mean, var, count


class MomentsEMA(NamedTuple):
  """Smoothed batch moments (an optax-style state).

  Attributes:
    mean: `[D]` float32 smoothed per-dimension batch mean.
    var: `[D]` float32 smoothed per-dimension batch variance.
    steps: `[]` int32 number of updates so far (0: nothing seen yet).
  """

  mean: jax.Array
  var: jax.Array
  steps: jax.Array


def init(dim: int) -> MomentsEMA:
  """An empty `MomentsEMA` for `dim` features (its first `update` takes the batch's)."""
  dim = int(dim)
  if dim <= 0:
    raise ValueError(f"dim must be positive; got {dim}")
  return MomentsEMA(
    mean=jnp.zeros((dim,), jnp.float32),
    var=jnp.zeros((dim,), jnp.float32),
    steps=jnp.zeros((), jnp.int32),
  )


def update(state: MomentsEMA, batch_mean, batch_var, *, decay) -> MomentsEMA:
  """One exponential-moving-average step of the batch moments.

  `x <- decay * x + (1 - decay) * x_batch` for the mean and the variance alike,
  except the first update, which takes the batch's moments as they are (no bias
  towards the zeros of `init`). This is the simple variant of the paper's
  smoothing: the paper tracks the moments with a Kalman filter (a per-step gain
  from the estimate's and the observation's variances); here the gain is the
  constant `1 - decay`. The variance is smoothed as a moment of its own (the
  spread of the batch means between steps is not added to it).

  Args:
    state: the `MomentsEMA` so far.
    batch_mean: `[D]` this step's batch mean (e.g. from `moments`).
    batch_var: `[D]` this step's batch variance.
    decay: `[]` in [0, 1) (float or traced); 0 keeps only the latest batch.
  Returns:
    The new `MomentsEMA`.
  """
  dim = state.mean.shape
  batch_mean = _check_vector(batch_mean, dim, "batch_mean")
  batch_var = _check_vector(batch_var, dim, "batch_var")
  if isinstance(decay, (int, float)) and not 0.0 <= decay < 1.0:
    raise ValueError(f"decay must be in [0, 1); got {decay}")
  keep = jnp.where(state.steps > 0, jnp.asarray(decay, jnp.float32), 0.0)
  return MomentsEMA(
    mean=keep * state.mean + (1.0 - keep) * batch_mean,
    var=keep * state.var + (1.0 - keep) * batch_var,
    steps=state.steps + 1,
  )


def match_moments(
  mem: MemoryState,
  batch_mean,
  batch_var,
  *,
  eps: float = 1e-6,
  renormalize: bool = True,
  axis_name: Optional[str] = None,
) -> MemoryState:
  """Shifts and scales the memory's valid rows so their moments match the batch's.

  Per dimension d, over the valid rows of the memory (all shards of it when
  `axis_name` is given):

      M[:, d] <- sqrt(var_B[d]) * (M[:, d] - m_M[d]) / sqrt(max(var_M[d], eps)) + m_B[d]

  so that afterwards the valid rows have mean `batch_mean` and variance
  `batch_var` exactly wherever `var_M >= eps` (a dimension on which the memory is
  constant becomes `batch_mean`, without NaN). Then, with `renormalize`, each
  corrected row is scaled to unit length, as the embeddings are. Invalid rows,
  labels, validity, pointer and ids are untouched; an empty memory is returned
  as it is. Costs O(size * dim) and no forward pass; computed in float32 and
  stored back in the memory's dtype.

  Args:
    mem: the memory; inside shard_map with `axis_name`, this device's shard.
    batch_mean: `[D]` target mean (the current batch's, or a smoothed estimate).
    batch_var: `[D]` target variance (negative values count as 0).
    eps: floor of the memory's variance in the division.
    renormalize: re-normalise the corrected rows to unit length.
    axis_name: mesh axis the memory's rows are split over, or None.
  Returns:
    The corrected `MemoryState`. Raises ValueError for a target of the wrong shape.
  """
  dim = mem.emb.shape[1:]
  batch_mean = _check_vector(batch_mean, dim, "batch_mean")
  batch_var = _check_vector(batch_var, dim, "batch_var")
  if not eps > 0:
    raise ValueError(f"eps must be positive; got {eps}")
  mean_m, var_m, _ = moments(mem.emb, mem.valid, axis_name=axis_name)
  scale = jnp.sqrt(jnp.maximum(batch_var, 0.0)) / jnp.sqrt(jnp.maximum(var_m, eps))
  corrected = (mem.emb.astype(jnp.float32) - mean_m) * scale + batch_mean
  if renormalize:
    corrected = l2_normalize(corrected)
  emb = jnp.where(mem.valid[:, None], corrected.astype(mem.emb.dtype), mem.emb)
  return mem._replace(emb=emb)


def _check_vector(x, shape, name: str) -> jax.Array:
  """`x` as a float32 array of `shape` (`[D]`); a ValueError naming `name` otherwise."""
  x = jnp.asarray(x)
  if x.shape != tuple(shape):
    raise ValueError(
      f"{name} must be [D]={list(shape)} (one value per dimension); got shape {tuple(x.shape)}"
    )
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a float array; got dtype {x.dtype}")
  return x.astype(jnp.float32)
