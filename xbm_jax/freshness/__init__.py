"""Keeping a stale memory close to the current model (at most one method per run).

`moments` (cross-batch normalisation: match the memory's moments to the batch's),
`momentum` (MoCo's EMA encoder embeds what is enqueued), `reprojection` (store pooled
features, re-embed them with the current head).
"""

from xbm_jax.freshness import moments, momentum, reprojection

__all__ = ["moments", "momentum", "reprojection"]
