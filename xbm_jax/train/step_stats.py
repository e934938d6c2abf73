"""Statistics of a train step combined over its parts (devices, micro-batches), and
the step's finiteness check."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from xbm_jax.parallel import DATA_AXIS

COUNT_KEYS = ("pos_pairs", "neg_pairs")


def combine_stats(aux: dict, total: Callable) -> dict:
  """Loss statistics of a whole batch from those of its parts (devices, micro-batches).

  `total(x)` sums `x` over the parts. Pair counts (`*pos_pairs`, `*neg_pairs`) are
  summed; a mean similarity `<p>mean_<kind>_sim` is weighted by its part's
  `<p><kind>_pairs` (a part with no such pair adds nothing), so it is the mean over
  all pairs of the batch, as one device holding the whole batch would log it;
  anything else is a plain mean over the parts.
  """
  out = {}
  for name, x in aux.items():
    head, _, tail = name.rpartition("mean_")
    count = f"{head}{tail[: -len('_sim')]}_pairs" if tail.endswith("_sim") else None
    if name.endswith(COUNT_KEYS):
      out[name] = total(x)
    elif count in aux:
      n = aux[count].astype(jnp.float32)
      out[name] = total(x * n) / jnp.maximum(total(n), 1)
    else:
      out[name] = total(x) / total(jnp.ones_like(x, jnp.float32))
  return out


def device_stats(aux: dict) -> dict:
  """`combine_stats` over the devices of the mesh (inside the mapped step)."""
  return combine_stats(aux, lambda x: jax.lax.psum(x, DATA_AXIS))


def all_finite(tree) -> jax.Array:
  """`[]` bool: no NaN/inf anywhere in `tree`. One reduction per leaf, fused into
  the step: a fraction of the backward pass, and it catches weights gone NaN while
  the loss still reads 0 (a NaN similarity fails every pair mask)."""
  flags = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)
