"""The memory terms computed in blocks of reference rows, exactly (no `[B, M]` matrix kept).

`blocks` (the shared blocked scan and its pair rules), `ms` (multi-similarity), `triplet`,
and `terms` (the entry points the built-in losses dispatch to).
"""

from xbm_jax.losses.fused import blocks, ms, terms, triplet

__all__ = ["blocks", "ms", "terms", "triplet"]
