"""The labeled set every loss and the memory take: unit vectors, labels, validity."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class Embeddings(NamedTuple):
  """A labeled set of embeddings (a batch, or anything shaped like one).

  Attributes:
    emb: `[N, D]` float (float32 or bfloat16), L2-normalised rows.
    labels: `[N]` integer class labels. Any integer is a label, 0 included.
    valid: optional `[N]` bool; False rows are padding and take part in no pair.
    ids: optional `[N]` int image ids (e.g. the dataset index of each row's image),
      for `self_exclusion="id"`: a pair of the same id is never a positive.
  """

  emb: jax.Array
  labels: jax.Array
  valid: Optional[jax.Array] = None
  ids: Optional[jax.Array] = None


def check(x, name: str = "embeddings") -> None:
  """Raises a clear ValueError/TypeError for malformed embeddings (at trace time)."""
  emb, labels = x.emb, x.labels
  if emb.ndim != 2:
    raise ValueError(f"{name}.emb must be [N, D]; got shape {tuple(emb.shape)}")
  if not jnp.issubdtype(emb.dtype, jnp.floating):
    raise TypeError(f"{name}.emb must be a float array; got dtype {emb.dtype}")
  if labels.shape != emb.shape[:1]:
    raise ValueError(
      f"{name}.labels must be [N]={emb.shape[:1]} to match emb "
      f"{tuple(emb.shape)}; got shape {tuple(labels.shape)}"
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{name}.labels must be integers; got dtype {labels.dtype}")
  valid = getattr(x, "valid", None)
  if valid is not None:
    if valid.shape != emb.shape[:1]:
      raise ValueError(f"{name}.valid must be [N]={emb.shape[:1]}; got shape {tuple(valid.shape)}")
    if valid.dtype != jnp.bool_:
      raise TypeError(f"{name}.valid must be bool; got dtype {valid.dtype}")
  ids = getattr(x, "ids", None)
  if ids is not None:
    if ids.shape != emb.shape[:1]:
      raise ValueError(f"{name}.ids must be [N]={emb.shape[:1]}; got shape {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"{name}.ids must be integers; got dtype {ids.dtype}")


def valid_mask(x) -> jax.Array:
  """`[N]` bool validity of a labeled set (all True where it has no mask)."""
  valid = getattr(x, "valid", None)
  if valid is None:
    return jnp.ones(x.labels.shape, jnp.bool_)
  return valid


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """Unit rows, as torch.nn.functional.normalize (norm clamped at eps)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps).astype(x.dtype)
