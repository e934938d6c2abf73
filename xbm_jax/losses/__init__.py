"""Pair losses over masked similarity matrices.

    loss = xbm_jax.losses.contrastive(batch, batch)   # in-batch term, L(B, B)
    loss = xbm_jax.losses.contrastive(batch, mem)     # memory term,   L(B, M)

Layout: `builtin` (contrastive, multi-similarity, triplet, supcon and the name registry),
`pairs` (the core every pair loss is written with: `pair_loss`, `reduction_loss`),
`scoring` (similarity and the self-exclusion rule), `fused/` (the blocked, exact memory
terms the built-ins dispatch to). XBM's total loss, which uses them, is one floor up:
`xbm_jax.objective.xbm_total_loss` (also `xbm_jax.xbm_total_loss`).
"""

from xbm_jax.losses import builtin, fused, pairs, scoring
from xbm_jax.losses.builtin import (
  LOSSES,
  TRIPLET_MINING,
  bind,
  bound_options,
  check_loss_options,
  contrastive,
  contrastive_plain,
  get,
  multi_similarity,
  multi_similarity_plain,
  resolve,
  supcon,
  triplet,
  triplet_plain,
)
from xbm_jax.losses.pairs import (
  EPS_SELF,
  EPS_SELF_16BIT,
  AnchorLoss,
  Rows,
  pair_loss,
  pair_masks,
  reduction_loss,
  self_threshold,
  similarity,
)

_FROM_OBJECTIVE = ("xbm_total_loss", "combine_terms")


def __getattr__(name):
  # `xbm_jax.losses.xbm_total_loss` was the old home of the objective; it is looked up
  # lazily so that this package does not import the module that imports it.
  if name in _FROM_OBJECTIVE:
    from xbm_jax import objective  # pylint: disable=g-import-not-at-top

    return getattr(objective, name)
  raise AttributeError(f"module 'xbm_jax.losses' has no attribute {name!r}")


__all__ = [
  "EPS_SELF",
  "EPS_SELF_16BIT",
  "LOSSES",
  "TRIPLET_MINING",
  "AnchorLoss",
  "Rows",
  "bind",
  "bound_options",
  "builtin",
  "check_loss_options",
  "contrastive",
  "contrastive_plain",
  "fused",
  "get",
  "multi_similarity",
  "multi_similarity_plain",
  "pair_loss",
  "pair_masks",
  "pairs",
  "reduction_loss",
  "resolve",
  "scoring",
  "self_threshold",
  "similarity",
  "supcon",
  "triplet",
  "triplet_plain",
]
