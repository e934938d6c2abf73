"""xbm_jax: Cross-Batch Memory for Embedding Learning (Wang et al., CVPR 2020) in JAX.

import xbm_jax
batch = xbm_jax.Embeddings(emb, labels)
mem = xbm_jax.memory.init(size=55_000, dim=128)
mem = xbm_jax.memory.enqueue(mem, batch)
loss = xbm_jax.losses.contrastive(batch, mem)
total, mem, aux = xbm_jax.xbm_total_loss(batch, batch, mem, step=t, start_step=1000)

The same with its settings bound once (optax's style), the loss configured as a value:
xbm = xbm_jax.CrossBatchMemory(size=55_000, dim=128, start_step=1000,
                               loss=xbm_jax.losses.bind(xbm_jax.losses.contrastive, margin=0.5))
mem = xbm.init()
total, mem, aux = xbm.update(batch, batch, mem, step=t)

The package, from the bottom up:
  memory/      the ring of past embeddings (`ring`), whole or split over devices (`sharded`)
  losses/      the built-in pair losses, the core to write your own (`pairs`), the blocked
               memory terms (`fused/`)
  objective    XBM's total loss: enqueue, then L(B, B) + w L(B, M)
  cross_batch  the same as one value with bound settings: CrossBatchMemory.init / update
  freshness/   keeping a stale memory close: `moments` (cross-batch normalisation),
               `momentum` (MoCo's EMA encoder), `reprojection` (re-embed stored features)
  control/     host-side policy: the drift-based start rule, the paired guard
  models/, data/, evaluation/, insight/ (reports and pictures), train/ (the trainer)

The old flat names (`xbm_jax.pairs`, `xbm_jax.sharded_memory`, `xbm_jax.drift_correction`,
`xbm_jax.momentum`, `xbm_jax.reprojection`) remain attributes of this package.
"""

from xbm_jax import freshness, losses, memory
from xbm_jax.cross_batch import CrossBatchMemory
from xbm_jax.embeddings import Embeddings, l2_normalize
from xbm_jax.freshness import momentum, reprojection
from xbm_jax.freshness import moments as drift_correction
from xbm_jax.losses import pairs
from xbm_jax.memory import MemoryState
from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.objective import combine_terms, xbm_total_loss

__version__ = "0.1.0"
__all__ = [
  "CrossBatchMemory",
  "Embeddings",
  "MemoryState",
  "combine_terms",
  "drift_correction",
  "freshness",
  "l2_normalize",
  "losses",
  "memory",
  "momentum",
  "pairs",
  "reprojection",
  "sharded_memory",
  "xbm_total_loss",
]
