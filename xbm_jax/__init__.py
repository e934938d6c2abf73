"""xbm_jax: Cross-Batch Memory for Embedding Learning (Wang et al., CVPR 2020) in JAX.

import xbm_jax
batch = xbm_jax.Embeddings(emb, labels)
mem = xbm_jax.memory.init(size=55_000, dim=128)
mem = xbm_jax.memory.enqueue(mem, batch)
loss = xbm_jax.losses.contrastive(batch, mem)
total, mem, aux = xbm_jax.losses.xbm_total_loss(batch, batch, mem, step=t, start_step=1000)

Your own pair loss, written once, with the memory (replicated or sharded):
`xbm_jax.pairs.pair_loss` / `xbm_jax.pairs.reduction_loss`.
Stale memory entries moved to the current batch's moments (cross batch normalization):
`xbm_jax.drift_correction.match_moments`. A memory of pooled features re-embedded by
the current head: `xbm_jax.reprojection`. A MoCo momentum encoder: `xbm_jax.momentum`.
A memory guard from a paired test on validation hits: `xbm_jax.paired_guard` (host-side,
imported on its own).
"""

from xbm_jax import drift_correction, losses, memory, momentum, pairs, reprojection, sharded_memory
from xbm_jax.embeddings import Embeddings, l2_normalize
from xbm_jax.memory import MemoryState

__version__ = "0.1.0"
__all__ = [
  "Embeddings",
  "MemoryState",
  "drift_correction",
  "losses",
  "memory",
  "momentum",
  "pairs",
  "reprojection",
  "sharded_memory",
  "l2_normalize",
]
