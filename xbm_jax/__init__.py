"""xbm_jax: Cross-Batch Memory for Embedding Learning (Wang et al., CVPR 2020) in JAX.

import xbm_jax
batch = xbm_jax.Embeddings(emb, labels)
mem = xbm_jax.memory.init(size=55_000, dim=128)
mem = xbm_jax.memory.enqueue(mem, batch)
loss = xbm_jax.losses.contrastive(batch, mem)
"""

from xbm_jax import losses, memory
from xbm_jax.embeddings import Embeddings, l2_normalize
from xbm_jax.memory import MemoryState

__version__ = "0.1.0"
__all__ = ["Embeddings", "MemoryState", "losses", "memory", "l2_normalize"]
