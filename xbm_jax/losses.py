"""Pair losses over masked similarity matrices, and XBM's total loss.

Every loss takes a `query` set (the anchors, e.g. the local batch) and a
`reference` set (the batch itself, or the memory), both labeled sets with
`emb`, `labels` and an optional `valid` mask (`Embeddings` or `MemoryState`):

    loss = contrastive(batch, batch)   # in-batch term, L(B, B)
    loss = contrastive(batch, mem)     # memory term,   L(B, M)

They are pure functions of the `[B, R]` cosine-similarity matrix and boolean
masks: no Python loops over pairs, no data-dependent shapes, so they run under
`jit`, `grad`, `vmap` and `shard_map`. Similarities are computed in float32
whatever the input dtype (bf16 inputs accumulate in f32).

Common keyword-only options:
  self_exclusion: how an anchor's own entry is removed from its positives.
    "similarity" (default, the reference code): positives need S < pos_threshold,
    which also drops exact duplicates of the anchor. `pos_threshold=None` (the
    default) means 1 - 1e-5 (the reference) when both sides are float32, and
    1 - 1e-2 when either side is 16-bit: rounding a unit vector to bf16 moves
    its self-similarity by up to ~1e-3, which would keep the anchor's own
    memory slot as a positive. "index": drop exactly the
    reference entry `self_index[i]` (e.g. `memory.last_slots(...)`, or
    `arange(B)` for the in-batch term). "none": keep every same-label pair.
  reduction: "paper" (default): the sum over anchors of each anchor's loss,
    divided by the number of valid anchors |A| (the reference's `/ batch_size`).
    "mean": the sum divided by the number of active pairs (contrastive: pairs
    contributing a non-zero term; triplet: active triplets; multi-similarity:
    anchors with mined pairs).
  return_stats: also return a dict of auxiliary statistics (active positive /
    negative pair counts and their mean similarities).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from xbm_jax import memory as memory_lib
from xbm_jax.embeddings import check, valid_mask

EPS_SELF = 1e-5
EPS_SELF_16BIT = 1e-2


def self_threshold(query, reference) -> float:
  """The default `pos_threshold` for these inputs' dtypes (see module doc)."""
  narrow = any(jnp.finfo(x.emb.dtype).bits < 32 for x in (query, reference))
  return 1.0 - (EPS_SELF_16BIT if narrow else EPS_SELF)
_SENTINEL = -4.0  # below any cosine similarity; marks masked-out negatives when sorted


def similarity(query, reference) -> jax.Array:
  """`[B, R]` float32 cosine similarities of unit rows (computed in f32).

  `Precision.HIGHEST` because the self rule `S < 1 - 1e-5` needs the exact
  float32 product: at the DEFAULT precision a GPU rounds float32 operands to
  TF32 (10-bit mantissa) and a TPU to bf16, which moves a unit row's
  self-similarity by ~1e-3 and keeps the anchor's own copy as a positive.
  """
  q, r = query.emb, reference.emb
  if q.shape[-1] != r.shape[-1]:
    raise ValueError(f"query dim {q.shape[-1]} does not match reference dim {r.shape[-1]}")
  if q.dtype != r.dtype:
    q, r = q.astype(jnp.float32), r.astype(jnp.float32)
  return jnp.matmul(q, r.T, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32).astype(jnp.float32)


def pair_masks(query, reference, sim: jax.Array, *, self_exclusion: str = "similarity",
               pos_threshold: Optional[float] = None,
               self_index: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """`([B, R], [B, R])` bool positive and negative pair masks.

  Positives: same label, both entries valid, minus the self pair (see module
  doc). Negatives: different label, both valid.
  """
  same = query.labels[:, None] == reference.labels[None, :]
  both = valid_mask(query)[:, None] & valid_mask(reference)[None, :]
  pos, neg = same & both, ~same & both
  if self_exclusion == "similarity":
    if pos_threshold is None:
      pos_threshold = self_threshold(query, reference)
    pos = pos & (sim < pos_threshold)
  elif self_exclusion == "index":
    if self_index is None:
      raise ValueError("self_exclusion='index' needs self_index: [B] int, the reference "
                       "index of each anchor's own entry (-1 for none)")
    self_index = jnp.asarray(self_index)
    if self_index.shape != query.labels.shape:
      raise ValueError(f"self_index must be [B]={query.labels.shape}; got "
                       f"{self_index.shape}")
    ref_idx = jnp.arange(reference.labels.shape[0], dtype=jnp.int32)
    pos = pos & (ref_idx[None, :] != self_index[:, None])
  elif self_exclusion != "none":
    raise ValueError(f"self_exclusion must be 'similarity', 'index' or 'none'; "
                     f"got {self_exclusion!r}")
  return pos, neg


def _prepare(query, reference, self_exclusion, pos_threshold, self_index, reduction):
  check(query, "query")
  check(reference, "reference")
  if reduction not in ("paper", "mean"):
    raise ValueError(f"reduction must be 'paper' or 'mean'; got {reduction!r}")
  sim = similarity(query, reference)
  pos, neg = pair_masks(query, reference, sim, self_exclusion=self_exclusion,
                        pos_threshold=pos_threshold, self_index=self_index)
  return sim, pos, neg


def _masked_mean(x, mask):
  n = jnp.sum(mask)
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(n, 1), n


def _stats(sim, pos_active, neg_active) -> dict:
  mean_pos, n_pos = _masked_mean(sim, pos_active)
  mean_neg, n_neg = _masked_mean(sim, neg_active)
  return {"pos_pairs": n_pos.astype(jnp.int32), "neg_pairs": n_neg.astype(jnp.int32),
          "mean_pos_sim": mean_pos, "mean_neg_sim": mean_neg}


def _reduce(per_anchor, query, n_active, reduction):
  total = jnp.sum(per_anchor)
  if reduction == "paper":
    denom = jnp.sum(valid_mask(query))
  else:
    denom = n_active
  return total / jnp.maximum(denom, 1).astype(jnp.float32)


def contrastive(query, reference, *, margin: float = 0.5,
                pos_threshold: Optional[float] = None,
                self_exclusion: str = "similarity", self_index=None,
                reduction: str = "paper", return_stats: bool = False):
  """XBM's contrastive loss (paper Eq. 4 as coded).

  L(A, R) = 1/|A| sum_i [ sum_{y_j = y_i, S_ij < 1-eps} (1 - S_ij)
                          + sum_{y_j != y_i, S_ij > margin} S_ij ]

  Args:
    query: anchors, emb `[B, D]`, labels `[B]`, optional valid `[B]`.
    reference: emb `[R, D]`, labels `[R]`, optional valid `[R]` (a batch or memory).
  Returns:
    `[]` float32 loss (and a stats dict if `return_stats`).
  """
  sim, pos, neg = _prepare(query, reference, self_exclusion, pos_threshold, self_index,
                           reduction)
  neg_active = neg & (sim > margin)
  per_anchor = (jnp.sum(jnp.where(pos, 1.0 - sim, 0.0), axis=1)
                + jnp.sum(jnp.where(neg_active, sim, 0.0), axis=1))
  n_active = jnp.sum(pos) + jnp.sum(neg_active)
  loss = _reduce(per_anchor, query, n_active, reduction)
  return (loss, _stats(sim, pos, neg_active)) if return_stats else loss


def _log1p_sum_exp(x, mask):
  """`[B]` log(1 + sum_j mask_ij * exp(x_ij)), stable and NaN-free in grad."""
  m = jax.lax.stop_gradient(jnp.maximum(jnp.max(jnp.where(mask, x, -jnp.inf), axis=1), 0.0))
  e = jnp.where(mask, jnp.exp(jnp.where(mask, x - m[:, None], 0.0)), 0.0)
  return m + jnp.log(jnp.exp(-m) + jnp.sum(e, axis=1))


def multi_similarity(query, reference, *, alpha: float = 2.0, beta: float = 40.0,
                     lam: float = 0.5, mining_margin: float = 0.1,
                     pos_threshold: Optional[float] = None,
                     self_exclusion: str = "similarity", self_index=None,
                     reduction: str = "paper", return_stats: bool = False):
  """Multi-similarity loss (Wang et al., CVPR 2019) with its pair mining, as coded
  in the XBM reference.

  Per anchor: keep negatives with S + margin > min positive S, positives with
  S - margin < max negative S; anchors lacking either contribute 0; else
    1/alpha log(1 + sum_pos exp(-alpha (S - lam))) + 1/beta log(1 + sum_neg exp(beta (S - lam))).
  """
  sim, pos, neg = _prepare(query, reference, self_exclusion, pos_threshold, self_index,
                           reduction)
  min_pos = jnp.min(jnp.where(pos, sim, jnp.inf), axis=1, keepdims=True)
  max_neg = jnp.max(jnp.where(neg, sim, -jnp.inf), axis=1, keepdims=True)
  neg_keep = neg & (sim + mining_margin > min_pos)
  pos_keep = pos & (sim - mining_margin < max_neg)
  has = jnp.any(neg_keep, axis=1) & jnp.any(pos_keep, axis=1)
  pos_term = _log1p_sum_exp(-alpha * (sim - lam), pos_keep) / alpha
  neg_term = _log1p_sum_exp(beta * (sim - lam), neg_keep) / beta
  per_anchor = jnp.where(has, pos_term + neg_term, 0.0)
  loss = _reduce(per_anchor, query, jnp.sum(has), reduction)
  if return_stats:
    return loss, _stats(sim, pos_keep & has[:, None], neg_keep & has[:, None])
  return loss


def _sorted_negatives(sim, neg):
  """Ascending `[B, R]` negative similarities (masked ones = sentinel, first),
  their suffix sums `[B, R+1]`, and the index of the first real negative `[B]`."""
  s = jnp.sort(jnp.where(neg, sim, _SENTINEL), axis=1)
  suffix = jnp.concatenate([jnp.cumsum(s[:, ::-1], axis=1)[:, ::-1],
                            jnp.zeros_like(s[:, :1])], axis=1)
  first = s.shape[1] - jnp.sum(neg, axis=1)
  return s, suffix, first


_searchsorted_rows = jax.vmap(
    lambda row, v, side: jnp.searchsorted(row, v, side=side), in_axes=(0, 0, None))


def triplet(query, reference, *, margin: float = 0.1, mining: str = "hard",
            pos_threshold: Optional[float] = None,
            self_exclusion: str = "similarity", self_index=None,
            reduction: str = "paper", return_stats: bool = False):
  """Hinge triplet loss on cosine similarity: relu(S_an - S_ap + margin).

  mining:
    "hard": per anchor, its least similar positive and most similar negative.
    "semihard": per (anchor, positive), the most similar negative with
      S_an < S_ap (FaceNet); if there is none, the least similar negative.
    "all": every (anchor, positive, negative) triplet.
  "semihard" and "all" never build the `[B, R, R]` cube: negatives are sorted
  once per anchor and each (a, p) pair is resolved by binary search, so the
  cost is O(B R log R) and a full memory is affordable.
  """
  if mining not in ("hard", "semihard", "all"):
    raise ValueError(f"mining must be 'hard', 'semihard' or 'all'; got {mining!r}")
  sim, pos, neg = _prepare(query, reference, self_exclusion, pos_threshold, self_index,
                           reduction)
  has_pos, has_neg = jnp.any(pos, axis=1), jnp.any(neg, axis=1)
  if mining == "hard":
    hp = jnp.min(jnp.where(pos, sim, 2.0), axis=1)
    hn = jnp.max(jnp.where(neg, sim, -2.0), axis=1)
    per = jnp.where(has_pos & has_neg, jax.nn.relu(hn - hp + margin), 0.0)
    per_anchor, n_active = per, jnp.sum(per > 0)
    pos_act = pos & (sim == hp[:, None]) & (per > 0)[:, None]
    neg_act = neg & (sim == hn[:, None]) & (per > 0)[:, None]
  else:
    s, suffix, first = _sorted_negatives(sim, neg)
    r = sim.shape[1]
    if mining == "all":
      t = sim - margin                                     # [B, R] per (a, p)
      idx = _searchsorted_rows(s, t, "right")              # first negative > t
      idx = jnp.maximum(idx, first[:, None])
      count = (r - idx).astype(jnp.float32)
      total = jnp.take_along_axis(suffix, idx, axis=1) - count * t
      pair = jnp.where(pos, total, 0.0)
      n_active = jnp.sum(jnp.where(pos, count, 0.0))
    else:
      idx = _searchsorted_rows(s, sim, "left") - 1         # largest negative < S_ap
      ok = idx >= first[:, None]
      idx = jnp.where(ok, idx, jnp.minimum(first, r - 1)[:, None])
      s_an = jnp.take_along_axis(s, idx, axis=1)
      pair = jnp.where(pos & has_neg[:, None], jax.nn.relu(s_an - sim + margin), 0.0)
      n_active = jnp.sum(pair > 0)
    per_anchor = jnp.sum(pair, axis=1)
    pos_act = pos & (pair > 0)
    neg_act = neg & (sim > (jnp.max(jnp.where(pos_act, sim, -2.0), axis=1,
                                    keepdims=True) - margin))
  loss = _reduce(per_anchor, query, n_active, reduction)
  return (loss, _stats(sim, pos_act, neg_act)) if return_stats else loss


LOSSES: dict[str, Callable] = {"contrastive": contrastive,
                               "multi_similarity": multi_similarity,
                               "triplet": triplet}


def get(name: str) -> Callable:
  """The loss function called `name`; a clear error lists the valid ones."""
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; valid: {sorted(LOSSES)}")
  return LOSSES[name]


def xbm_total_loss(query, batch, mem, *, step, start_step, weight=1.0,
                   loss_fn: Callable = contrastive, enqueue: bool = True,
                   batch_self_index=None, memory_self_index=None,
                   memory_loss_kwargs: Optional[dict] = None, **loss_kwargs):
  """XBM's objective for one step: enqueue first, then L(Q, B) + w * L(Q, M).

  From `start_step` on (`step >= start_step`, both may be traced) the detached
  `batch` is enqueued into `mem` before the losses, so the memory term also
  sees the current batch, as in the reference. Before it, the memory is left
  untouched and its term is weighted by 0 — chosen with `jnp.where`, so one
  compiled step serves the whole run.

  Args:
    query: anchors (the local batch under data parallelism), `[Bq, D]`.
    batch: the (gathered, global) batch `[B, D]`; the in-batch term sends
      gradient to both sides.
    mem: a `MemoryState`; the memory term sends gradient to the anchors only.
    step, start_step: ints or `[]` int arrays. weight: float or `[]` array.
    loss_fn: one of `contrastive`, `multi_similarity`, `triplet` (or alike).
    enqueue: False if the caller enqueued already (e.g. a sharded memory).
    batch_self_index / memory_self_index: `self_index` for each term when
      `self_exclusion="index"` (memory default: the slots of this enqueue,
      assuming `query` is the whole batch).
    memory_loss_kwargs: overrides of `loss_kwargs` for the memory term only,
      e.g. `{"reduction": "mean"}` to average it over its active pairs.
  Returns:
    `(loss, new_mem, aux)` with aux = {"loss_batch", "loss_xbm", "xbm_weight",
    "batch/<stat>", "xbm/<stat>"}.
  """
  active = jnp.asarray(step) >= jnp.asarray(start_step)
  if enqueue:
    mem = memory_lib.enqueue(mem, batch, when=active)
  if loss_kwargs.get("self_exclusion") == "index" and batch_self_index is None:
    if query.emb.shape[0] == batch.emb.shape[0]:
      batch_self_index = jnp.arange(batch.emb.shape[0], dtype=jnp.int32)
  mem_kwargs = {**loss_kwargs, **(memory_loss_kwargs or {})}
  if mem_kwargs.get("self_exclusion") == "index" and memory_self_index is None:
    if query.emb.shape[0] == batch.emb.shape[0]:
      memory_self_index = memory_lib.last_slots(mem, batch.emb.shape[0])
  loss_b, stats_b = loss_fn(query, batch, return_stats=True,
                            self_index=batch_self_index, **loss_kwargs)
  loss_m, stats_m = loss_fn(query, mem, return_stats=True,
                            self_index=memory_self_index, **mem_kwargs)
  loss, aux = combine_terms(loss_b, stats_b, loss_m, stats_m, active=active, weight=weight)
  return loss, mem, aux


def combine_terms(loss_b, stats_b, loss_m, stats_m, *, active, weight):
  """`(L_B + w * L_M, aux)` with w = weight where `active`, else 0 (traced)."""
  w = jnp.where(active, jnp.asarray(weight, jnp.float32), 0.0)
  aux = {"loss_batch": loss_b, "loss_xbm": loss_m, "xbm_weight": w}
  aux.update({f"batch/{k}": v for k, v in stats_b.items()})
  aux.update({f"xbm/{k}": v for k, v in stats_m.items()})
  return loss_b + w * loss_m, aux
