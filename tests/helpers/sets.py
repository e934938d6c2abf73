"""Random labelled sets for the loss, memory and search tests."""

import jax.numpy as jnp
import numpy as np

from xbm_jax.embeddings import Embeddings


def unit(rng, n, d, dtype=np.float32):
  """`[n, d]` random unit rows."""
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def as_set(emb, labels, valid=None):
  """An `Embeddings` of host arrays (`valid` optional)."""
  return Embeddings(
    jnp.asarray(emb), jnp.asarray(labels), None if valid is None else jnp.asarray(valid)
  )
