"""Exact losses against a memory sharded over a mesh axis (call inside shard_map).

Which anchors each device owns: device d's loss is its LOCAL anchors against
the WHOLE memory, i.e. it returns the same value (and stats) as

    losses.<name>(local_query, full_memory, **kwargs)

computed with a replicated memory, where `full_memory` is the global array of
the sharded memory (rows shard-major; slot ids = rows, see sharded_memory).
So a train step with a sharded memory is the replicated train step, whatever
the reduction; with reduction "paper" and as many valid anchors on every
device, the pmean of the per-device losses is the replicated loss of the
global batch. (Tested with shard_map's default check_vma=True.)

How: the anchors are all-gathered (`[n*b, D]`, small); each device scores all
of them against its `[k, D]` shard and reduces each anchor's row to partial
terms, which combine across devices with collectives:
  contrastive: per-anchor sums (psum).
  multi_similarity: mining thresholds min positive / max negative (pmin/pmax),
    mined-pair counts (psum), and each log(1 + sum exp) as a psum of exp
    terms under a pmax'd stabiliser.
  triplet "hard": global hardest positive / negative (pmin/pmax); the value is
    re-read through a one-hot psum so the gradient reaches the winning shard
    (ties split the gradient evenly, as `jnp.min` does).
  triplet "semihard" / "all": every (anchor, positive) pair needs the sorted
    negatives of all shards, so the similarity rows are sent to the anchors'
    owners with all_to_all (`[b, size]` per device, the size of the
    replicated loss's own matrix), with their pair masks.
Each device then keeps its own anchors' rows. Gradients flow to the anchors
through the all_gather (transposed to a reduce-scatter) and the collectives,
both for `jax.grad` inside the shard_map body (the train step) and for
`jax.grad` of the whole shard_mapped function.

Options are those of `xbm_jax.losses`; `self_exclusion="index"` takes
`self_index` as `[b]` GLOBAL slot ids (`sharded_memory.local_last_slots`).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from xbm_jax import losses, sharded_memory
from xbm_jax.embeddings import Embeddings, check, valid_mask

EPS_SELF = losses.EPS_SELF
sg = jax.lax.stop_gradient


class _Ctx(NamedTuple):
  sim: jax.Array       # [G, k] f32, all G = n*b anchors vs the local shard
  pos: jax.Array       # [G, k] bool
  neg: jax.Array       # [G, k] bool
  start: jax.Array     # [] int32, first global anchor row owned here
  b: int               # local anchors
  local_valid: jax.Array  # [b] bool
  axis: str


def _gather(x, axis):
  return jax.lax.all_gather(x, axis, tiled=True)


def _setup(query, shard, axis, self_exclusion, pos_threshold, self_index, reduction) -> _Ctx:
  check(query, "query")
  check(shard, "memory shard")
  if reduction not in ("paper", "mean"):
    raise ValueError(f"reduction must be 'paper' or 'mean'; got {reduction!r}")
  b = query.emb.shape[0]
  k = shard.emb.shape[0]
  me = jax.lax.axis_index(axis)
  local_valid = valid_mask(query)
  gq = Embeddings(_gather(query.emb, axis), _gather(query.labels, axis),
                  _gather(local_valid, axis))
  if self_exclusion == "index":
    if self_index is None:
      raise ValueError("self_exclusion='index' needs self_index: [b] int GLOBAL slot ids of "
                       "each local anchor's own memory entry (-1 for none)")
    self_index = jnp.asarray(self_index)
    if self_index.shape != query.labels.shape:
      raise ValueError(f"self_index must be [b]={query.labels.shape}; got {self_index.shape}")
    # Global slot id -> this shard's local row; other shards' ids fall outside [0, k).
    self_index = _gather(self_index.astype(jnp.int32), axis) - me * k
    self_index = jnp.where(self_index >= 0, self_index, k)
  sim = losses.similarity(gq, shard)
  pos, neg = losses.pair_masks(gq, shard, sim, self_exclusion=self_exclusion,
                               pos_threshold=pos_threshold, self_index=self_index)
  return _Ctx(sim, pos, neg, (me * b).astype(jnp.int32), b, local_valid, axis)


def _own(c: _Ctx, x):
  """This device's rows of a `[G, ...]` per-anchor array."""
  return jax.lax.dynamic_slice_in_dim(x, c.start, c.b, axis=0)


def _allsum(c: _Ctx, x, mask):
  """`[G]` per-anchor sum over the whole memory of x where mask, for ALL anchors
  (every device must use the same mask for an anchor: partial sums add up)."""
  return jax.lax.psum(jnp.sum(jnp.where(mask, x, 0), axis=1), c.axis)


def _rowsum(c: _Ctx, x, mask):
  """`[b]` per-local-anchor sum over the whole memory of x where mask."""
  return _own(c, _allsum(c, x, mask))


def _reduce(c: _Ctx, per_anchor, n_active, reduction):
  denom = jnp.sum(c.local_valid) if reduction == "paper" else n_active
  return jnp.sum(per_anchor) / jnp.maximum(denom, 1).astype(jnp.float32)


def _stats(c: _Ctx, pos_active, neg_active) -> dict:
  s = sg(c.sim)
  out = {}
  for name, mask in (("pos", pos_active), ("neg", neg_active)):
    n = jnp.sum(_rowsum(c, jnp.ones_like(s, jnp.int32), mask))
    total = jnp.sum(_rowsum(c, s, mask))
    out[f"{name}_pairs"] = n.astype(jnp.int32)
    out[f"mean_{name}_sim"] = total / jnp.maximum(n, 1)
  return {k: out[k] for k in ("pos_pairs", "neg_pairs", "mean_pos_sim", "mean_neg_sim")}


def contrastive(query, shard, *, axis_name: str = "data", margin: float = 0.5,
                pos_threshold: Optional[float] = None, self_exclusion: str = "similarity",
                self_index=None, reduction: str = "paper", return_stats: bool = False):
  """`losses.contrastive(query, full_memory)` with the memory sharded (see module doc).

  Args:
    query: this device's anchors, emb `[b, D]`, labels `[b]`, optional valid `[b]`.
    shard: this device's memory shard (emb `[k, D]`, labels, valid) or any
      labeled set split over `axis_name`.
  Returns:
    `[]` float32 loss of the local anchors (and a stats dict if `return_stats`).
  """
  c = _setup(query, shard, axis_name, self_exclusion, pos_threshold, self_index, reduction)
  neg_active = c.neg & (sg(c.sim) > margin)
  per_anchor = _rowsum(c, 1.0 - c.sim, c.pos) + _rowsum(c, c.sim, neg_active)
  n_active = jnp.sum(_rowsum(c, 1, c.pos)) + jnp.sum(_rowsum(c, 1, neg_active))
  loss = _reduce(c, per_anchor, n_active, reduction)
  return (loss, _stats(c, c.pos, neg_active)) if return_stats else loss


def _log1p_sum_exp(c: _Ctx, x, mask):
  """`[b]` log(1 + sum over ALL shards of mask * exp(x)), as losses._log1p_sum_exp."""
  m = jax.lax.pmax(jnp.max(jnp.where(mask, sg(x), -jnp.inf), axis=1), c.axis)
  m = jnp.maximum(m, 0.0)
  e = jnp.where(mask, jnp.exp(jnp.where(mask, x - m[:, None], 0.0)), 0.0)
  m = _own(c, m)
  return m + jnp.log(jnp.exp(-m) + _rowsum(c, e, True))


def multi_similarity(query, shard, *, axis_name: str = "data", alpha: float = 2.0,
                     beta: float = 40.0, lam: float = 0.5, mining_margin: float = 0.1,
                     pos_threshold: Optional[float] = None, self_exclusion: str = "similarity",
                     self_index=None, reduction: str = "paper", return_stats: bool = False):
  """`losses.multi_similarity(query, full_memory)` with the memory sharded."""
  c = _setup(query, shard, axis_name, self_exclusion, pos_threshold, self_index, reduction)
  s = sg(c.sim)
  min_pos = jax.lax.pmin(jnp.min(jnp.where(c.pos, s, jnp.inf), axis=1), axis_name)
  max_neg = jax.lax.pmax(jnp.max(jnp.where(c.neg, s, -jnp.inf), axis=1), axis_name)
  neg_keep = c.neg & (s + mining_margin > min_pos[:, None])
  pos_keep = c.pos & (s - mining_margin < max_neg[:, None])
  has_all = (_allsum(c, 1, neg_keep) > 0) & (_allsum(c, 1, pos_keep) > 0)  # [G]
  has = _own(c, has_all)
  pos_term = _log1p_sum_exp(c, -alpha * (c.sim - lam), pos_keep) / alpha
  neg_term = _log1p_sum_exp(c, beta * (c.sim - lam), neg_keep) / beta
  per_anchor = jnp.where(has, pos_term + neg_term, 0.0)
  loss = _reduce(c, per_anchor, jnp.sum(has), reduction)
  if return_stats:
    return loss, _stats(c, pos_keep & has_all[:, None], neg_keep & has_all[:, None])
  return loss


def _global_extreme(c: _Ctx, x, mask, fill, op):
  """`[G]` min (op=pmin) or max over all shards of x where mask, with a gradient
  that reaches the winning entries (split evenly over ties, like jnp.min)."""
  local_fn = jnp.min if op is jax.lax.pmin else jnp.max
  xm = jnp.where(mask, x, fill)
  loc = local_fn(xm, axis=1)                       # [G], differentiable locally
  best = op(sg(loc), c.axis)                       # [G] global value, no gradient
  ties = jnp.sum(sg(xm) == best[:, None], axis=1)  # [G] winners on this shard
  n_ties = jnp.maximum(jax.lax.psum(ties, c.axis), 1)
  # Exactly `best` in value; d/d(loc) = ties / n_ties on each winning shard.
  delta = jnp.where(sg(loc) == best, (loc - sg(loc)) * ties, 0.0)
  return best + jax.lax.psum(delta, c.axis) / n_ties


def _full_rows(c: _Ctx):
  """This device's anchors against the whole memory: `[b, size]` sim rows and
  pair masks in global slot order, via all_to_all (the transpose of a row split)."""
  rows = jax.lax.all_to_all(c.sim, c.axis, split_axis=0, concat_axis=1, tiled=True)
  pos = jax.lax.all_to_all(c.pos, c.axis, split_axis=0, concat_axis=1, tiled=True)
  neg = jax.lax.all_to_all(c.neg, c.axis, split_axis=0, concat_axis=1, tiled=True)
  return rows, pos, neg


def triplet(query, shard, *, axis_name: str = "data", margin: float = 0.1,
            mining: str = "hard", pos_threshold: Optional[float] = None,
            self_exclusion: str = "similarity", self_index=None,
            reduction: str = "paper", return_stats: bool = False):
  """`losses.triplet(query, full_memory)` with the memory sharded.

  "hard" combines per-anchor extremes across shards; "semihard" and "all"
  bring each device's anchor rows of the whole memory to it (all_to_all),
  then mine exactly as `losses.triplet` (O(b * size log size) per device).
  """
  if mining not in ("hard", "semihard", "all"):
    raise ValueError(f"mining must be 'hard', 'semihard' or 'all'; got {mining!r}")
  c = _setup(query, shard, axis_name, self_exclusion, pos_threshold, self_index, reduction)
  if mining == "hard":
    has_both = (_allsum(c, 1, c.pos) > 0) & (_allsum(c, 1, c.neg) > 0)   # [G]
    hp_all = _global_extreme(c, c.sim, c.pos, 2.0, jax.lax.pmin)
    hn_all = _global_extreme(c, c.sim, c.neg, -2.0, jax.lax.pmax)
    per_all = jnp.where(has_both, jax.nn.relu(hn_all - hp_all + margin), 0.0)
    per = _own(c, per_all)
    loss = _reduce(c, per, jnp.sum(per > 0), reduction)
    if not return_stats:
      return loss
    s, on = sg(c.sim), (sg(per_all) > 0)[:, None]
    pos_act = c.pos & (s == sg(hp_all)[:, None]) & on
    neg_act = c.neg & (s == sg(hn_all)[:, None]) & on
    return loss, _stats(c, pos_act, neg_act)
  # semihard / all: the owner sees its anchors' rows of the whole memory.
  sim, pos, neg = _full_rows(c)
  has_neg = jnp.any(neg, axis=1)
  s_sorted, suffix, first = losses._sorted_negatives(sim, neg)
  r = sim.shape[1]
  if mining == "all":
    t = sim - margin
    idx = jnp.maximum(losses._searchsorted_rows(s_sorted, t, "right"), first[:, None])
    count = (r - idx).astype(jnp.float32)
    pair = jnp.where(pos, jnp.take_along_axis(suffix, idx, axis=1) - count * t, 0.0)
    n_active = jnp.sum(jnp.where(pos, count, 0.0))
  else:
    idx = losses._searchsorted_rows(s_sorted, sim, "left") - 1
    ok = idx >= first[:, None]
    idx = jnp.where(ok, idx, jnp.minimum(first, r - 1)[:, None])
    s_an = jnp.take_along_axis(s_sorted, idx, axis=1)
    pair = jnp.where(pos & has_neg[:, None], jax.nn.relu(s_an - sim + margin), 0.0)
    n_active = jnp.sum(pair > 0)
  loss = _reduce(c, jnp.sum(pair, axis=1), n_active, reduction)
  if not return_stats:
    return loss
  pos_act = pos & (pair > 0)
  neg_act = neg & (sim > (jnp.max(jnp.where(pos_act, sim, -2.0), axis=1, keepdims=True)
                          - margin))
  return loss, losses._stats(sg(sim), pos_act, neg_act)


LOSSES: dict[str, Callable] = {"contrastive": contrastive,
                               "multi_similarity": multi_similarity,
                               "triplet": triplet}


def get(name: str) -> Callable:
  """The sharded loss called `name` (the names of `losses.LOSSES`; `losses.get`
  gives the clear error for an unknown one)."""
  losses.get(name)
  return LOSSES[name]


def xbm_total_loss(query, batch, shard, *, step, start_step, weight=1.0,
                   loss: str = "contrastive", axis_name: str = "data",
                   enqueue: bool = True, batch_self_index=None,
                   memory_self_index=None, memory_loss_kwargs: Optional[dict] = None,
                   **loss_kwargs):
  """`losses.xbm_total_loss` for a sharded memory (call inside shard_map).

  From `start_step` on, this device enqueues its own `query` (detached) into
  its own shard, then returns L(Q, B) + w * L(Q, M) with the memory term
  computed exactly over all shards. The in-batch term is `losses.<loss>`.

  Args:
    query: this device's batch `[b, D]` (the anchors and what it enqueues).
    batch: the gathered global batch `[n*b, D]` (device-major).
    shard: this device's memory shard (emb `[k, D]`, ptr `[1]`).
    batch_self_index / memory_self_index: for `self_exclusion="index"`; the
      defaults are the local anchors' rows in `batch` and the global slots of
      this enqueue.
  Returns:
    `(loss, new_shard, aux)` with the keys of `losses.xbm_total_loss`.
  """
  active = jnp.asarray(step) >= jnp.asarray(start_step)
  b = query.emb.shape[0]
  if enqueue:
    shard = sharded_memory.enqueue_local(shard, query, when=active)
  if loss_kwargs.get("self_exclusion") == "index" and batch_self_index is None:
    batch_self_index = jax.lax.axis_index(axis_name) * b + jnp.arange(b, dtype=jnp.int32)
  if {**loss_kwargs, **(memory_loss_kwargs or {})}.get("self_exclusion") == "index":
    if memory_self_index is None:
      memory_self_index = sharded_memory.local_last_slots(shard, b, axis_name=axis_name)
  loss_b, stats_b = losses.get(loss)(query, batch, return_stats=True,
                                     self_index=batch_self_index, **loss_kwargs)
  loss_m, stats_m = get(loss)(query, shard, axis_name=axis_name, return_stats=True,
                              self_index=memory_self_index,
                              **{**loss_kwargs, **(memory_loss_kwargs or {})})
  total, aux = losses.combine_terms(loss_b, stats_b, loss_m, stats_m, active=active,
                                    weight=weight)
  return total, shard, aux
