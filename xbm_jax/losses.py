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
  axis_name: None (default): `reference` is whole. A mesh axis name: `reference`
    is this device's slice of a reference split over that axis (a sharded memory,
    rows shard-major; call inside shard_map), and the loss returns exactly what
    the same loss gives for the local anchors against the whole reference (value,
    stats and gradient). Each loss is one set of per-anchor reductions over the
    reference; when split, the anchors are all-gathered (`[n*b, D]`, small), each
    device reduces its slice, and the partial results combine with psum (sums,
    counts, log-sum-exp under a pmax'd stabiliser), pmin/pmax (mining
    thresholds; hardest pairs, re-read through a psum so the gradient reaches
    the winning slice) or, for triplet "semihard"/"all", an all_to_all that
    brings each device its anchors' whole rows. `self_exclusion="index"` then
    takes GLOBAL slot ids (`sharded_memory.local_last_slots`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from xbm_jax import memory as memory_lib, sharded_memory
from xbm_jax.embeddings import Embeddings, check, valid_mask

sg = jax.lax.stop_gradient

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
  return jnp.matmul(
    q, r.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
  ).astype(jnp.float32)


def pair_masks(
  query,
  reference,
  sim: jax.Array,
  *,
  self_exclusion: str = "similarity",
  pos_threshold: Optional[float] = None,
  self_index: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
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
      raise ValueError(
        "self_exclusion='index' needs self_index: [B] int, the reference "
        "index of each anchor's own entry (-1 for none)"
      )
    self_index = jnp.asarray(self_index)
    _check_self_index(self_index, query.labels.shape)
    ref_idx = jnp.arange(reference.labels.shape[0], dtype=jnp.int32)
    pos = pos & (ref_idx[None, :] != self_index[:, None])
  elif self_exclusion != "none":
    raise ValueError(
      f"self_exclusion must be 'similarity', 'index' or 'none'; got {self_exclusion!r}"
    )
  return pos, neg


class _Ref(NamedTuple):
  """Anchors scored against a reference set that may be split over a mesh axis.

  Every loss below is a set of per-anchor reductions (sums, minima, maxima) over
  the reference's columns. With `axis=None` the reference is whole and `sim` is
  `[b, R]`; with a mesh axis each device holds a `[k, D]` slice of it, `sim` is
  ALL `G = n*b` anchors (all-gathered) against the local slice, and each
  reduction completes across devices with a collective, so every device then
  keeps its own anchors' rows. One code path, the same value either way.
  """

  sim: jax.Array  # [G, R] f32
  pos: jax.Array  # [G, R] bool
  neg: jax.Array  # [G, R] bool
  axis: Optional[str]
  start: jax.Array  # [] int32: this device's first row in G (0 if whole)
  b: int  # local anchors
  local_valid: jax.Array  # [b] bool


def _score(
  query, reference, axis_name, self_exclusion, pos_threshold, self_index, reduction
) -> _Ref:
  check(query, "query")
  check(reference, "reference")
  if reduction not in ("paper", "mean"):
    raise ValueError(f"reduction must be 'paper' or 'mean'; got {reduction!r}")
  local_valid, b = valid_mask(query), query.emb.shape[0]
  start = jnp.int32(0)
  if axis_name is not None:
    k = reference.emb.shape[0]
    me = jax.lax.axis_index(axis_name)
    gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
    query = Embeddings(gather(query.emb), gather(query.labels), gather(local_valid))
    start = (me * b).astype(jnp.int32)
    if self_exclusion == "index" and self_index is not None:
      _check_self_index(self_index, (b,))
      # Global slot ids -> this slice's local rows; other slices' ids fall outside.
      idx = gather(jnp.asarray(self_index).astype(jnp.int32)) - me * k
      self_index = jnp.where(idx >= 0, idx, k)
  sim = similarity(query, reference)
  pos, neg = pair_masks(
    query,
    reference,
    sim,
    self_exclusion=self_exclusion,
    pos_threshold=pos_threshold,
    self_index=self_index,
  )
  return _Ref(sim, pos, neg, axis_name, start, b, local_valid)


def _check_self_index(self_index, shape):
  if jnp.shape(self_index) != tuple(shape):
    raise ValueError(f"self_index must be [B]={tuple(shape)}; got {jnp.shape(self_index)}")


def _own(c: _Ref, x):
  """This device's rows of a `[G, ...]` per-anchor array."""
  if c.axis is None:
    return x
  return jax.lax.dynamic_slice_in_dim(x, c.start, c.b, axis=0)


def _across(c: _Ref, op, x):
  """Completes a per-anchor reduction over the reference's slices (psum/pmin/pmax)."""
  return x if c.axis is None else op(x, c.axis)


def _allsum(c: _Ref, x, mask):
  """`[G]` per-anchor sum over the whole reference of x where mask."""
  return _across(c, jax.lax.psum, jnp.sum(jnp.where(mask, x, 0), axis=1))


def _rowsum(c: _Ref, x, mask):
  """`[b]` per-local-anchor sum over the whole reference of x where mask."""
  return _own(c, _allsum(c, x, mask))


def _reduce(c: _Ref, per_anchor, n_active, reduction):
  denom = jnp.sum(c.local_valid) if reduction == "paper" else n_active
  return jnp.sum(per_anchor) / jnp.maximum(denom, 1).astype(jnp.float32)


def _stats(c: _Ref, pos_active, neg_active) -> dict:
  s = sg(c.sim)
  out = {}
  for name, mask in (("pos", pos_active), ("neg", neg_active)):
    n = jnp.sum(_rowsum(c, jnp.ones_like(s, jnp.int32), mask))
    out[f"{name}_pairs"] = n.astype(jnp.int32)
    out[f"mean_{name}_sim"] = jnp.sum(_rowsum(c, s, mask)) / jnp.maximum(n, 1)
  return {k: out[k] for k in ("pos_pairs", "neg_pairs", "mean_pos_sim", "mean_neg_sim")}


def contrastive(
  query,
  reference,
  *,
  margin: float = 0.5,
  pos_threshold: Optional[float] = None,
  self_exclusion: str = "similarity",
  self_index=None,
  reduction: str = "paper",
  return_stats: bool = False,
  axis_name: Optional[str] = None,
):
  """XBM's contrastive loss (paper Eq. 4 as coded).

  L(A, R) = 1/|A| sum_i [ sum_{y_j = y_i, S_ij < 1-eps} (1 - S_ij)
                          + sum_{y_j != y_i, S_ij > margin} S_ij ]

  Args:
    query: anchors, emb `[B, D]`, labels `[B]`, optional valid `[B]`.
    reference: emb `[R, D]`, labels `[R]`, optional valid `[R]` (a batch or memory);
      with `axis_name`, this device's slice of a reference split over that mesh axis
      (call inside shard_map; see the module doc).
  Returns:
    `[]` float32 loss (and a stats dict if `return_stats`).
  """
  c = _score(query, reference, axis_name, self_exclusion, pos_threshold, self_index, reduction)
  neg_active = c.neg & (sg(c.sim) > margin)
  per_anchor = _rowsum(c, 1.0 - c.sim, c.pos) + _rowsum(c, c.sim, neg_active)
  n_active = jnp.sum(_rowsum(c, 1, c.pos)) + jnp.sum(_rowsum(c, 1, neg_active))
  loss = _reduce(c, per_anchor, n_active, reduction)
  return (loss, _stats(c, c.pos, neg_active)) if return_stats else loss


def _log1p_sum_exp(c: _Ref, x, mask):
  """`[b]` log(1 + sum over the whole reference of mask * exp(x)): stable (a max
  stabiliser taken across slices) and NaN-free in grad."""
  m = _across(c, jax.lax.pmax, jnp.max(jnp.where(mask, sg(x), -jnp.inf), axis=1))
  m = jnp.maximum(m, 0.0)
  e = jnp.where(mask, jnp.exp(jnp.where(mask, x - m[:, None], 0.0)), 0.0)
  m = _own(c, m)
  return m + jnp.log(jnp.exp(-m) + _rowsum(c, e, True))


def multi_similarity(
  query,
  reference,
  *,
  alpha: float = 2.0,
  beta: float = 40.0,
  lam: float = 0.5,
  mining_margin: float = 0.1,
  pos_threshold: Optional[float] = None,
  self_exclusion: str = "similarity",
  self_index=None,
  reduction: str = "paper",
  return_stats: bool = False,
  axis_name: Optional[str] = None,
):
  """Multi-similarity loss (Wang et al., CVPR 2019) with its pair mining, as coded
  in the XBM reference.

  Per anchor: keep negatives with S + margin > min positive S, positives with
  S - margin < max negative S; anchors lacking either contribute 0; else
    1/alpha log(1 + sum_pos exp(-alpha (S - lam))) + 1/beta log(1 + sum_neg exp(beta (S - lam))).
  """
  c = _score(query, reference, axis_name, self_exclusion, pos_threshold, self_index, reduction)
  s = sg(c.sim)
  min_pos = _across(c, jax.lax.pmin, jnp.min(jnp.where(c.pos, s, jnp.inf), axis=1))
  max_neg = _across(c, jax.lax.pmax, jnp.max(jnp.where(c.neg, s, -jnp.inf), axis=1))
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


def _extreme(c: _Ref, x, mask, fill, kind: str):
  """`[G]` min or max over the whole reference of x where mask. Across slices, the
  value is re-read through a psum so the gradient reaches the winning entries
  (split evenly over ties, as `jnp.min` does)."""
  local_fn, op = (jnp.min, jax.lax.pmin) if kind == "min" else (jnp.max, jax.lax.pmax)
  xm = jnp.where(mask, x, fill)
  loc = local_fn(xm, axis=1)
  if c.axis is None:
    return loc
  best = op(sg(loc), c.axis)
  ties = jnp.sum(sg(xm) == best[:, None], axis=1)
  n_ties = jnp.maximum(jax.lax.psum(ties, c.axis), 1)
  delta = jnp.where(sg(loc) == best, (loc - sg(loc)) * ties, 0.0)
  return best + jax.lax.psum(delta, c.axis) / n_ties


def _full_rows(c: _Ref) -> _Ref:
  """This device's anchors against the WHOLE reference, as a whole-reference `_Ref`
  (`[b, R]` rows in global column order; all_to_all when split)."""
  if c.axis is None:
    return c
  a2a = lambda x: jax.lax.all_to_all(x, c.axis, split_axis=0, concat_axis=1, tiled=True)
  return _Ref(a2a(c.sim), a2a(c.pos), a2a(c.neg), None, jnp.int32(0), c.b, c.local_valid)


def _sorted_negatives(sim, neg):
  """Ascending `[B, R]` negative similarities (masked ones = sentinel, first),
  their suffix sums `[B, R+1]`, and the index of the first real negative `[B]`."""
  s = jnp.sort(jnp.where(neg, sim, _SENTINEL), axis=1)
  suffix = jnp.concatenate(
    [jnp.cumsum(s[:, ::-1], axis=1)[:, ::-1], jnp.zeros_like(s[:, :1])], axis=1
  )
  first = s.shape[1] - jnp.sum(neg, axis=1)
  return s, suffix, first


_searchsorted_rows = jax.vmap(
  lambda row, v, side: jnp.searchsorted(row, v, side=side), in_axes=(0, 0, None)
)


def _triplet_hard(c: _Ref, margin):
  has_both = (_allsum(c, 1, c.pos) > 0) & (_allsum(c, 1, c.neg) > 0)  # [G]
  hp = _extreme(c, c.sim, c.pos, 2.0, "min")
  hn = _extreme(c, c.sim, c.neg, -2.0, "max")
  per_all = jnp.where(has_both, jax.nn.relu(hn - hp + margin), 0.0)
  on = (sg(per_all) > 0)[:, None]
  s = sg(c.sim)
  pos_act = c.pos & (s == sg(hp)[:, None]) & on
  neg_act = c.neg & (s == sg(hn)[:, None]) & on
  per = _own(c, per_all)
  return c, per, jnp.sum(per > 0), pos_act, neg_act


def _triplet_sorted(c: _Ref, margin, mining):
  """ "semihard" / "all" on whole rows: negatives sorted once per anchor, each
  (a, p) pair resolved by binary search (never the [B, R, R] cube)."""
  c = _full_rows(c)
  sim, pos, neg = c.sim, c.pos, c.neg
  s, suffix, first = _sorted_negatives(sim, neg)
  r = sim.shape[1]
  if mining == "all":
    t = sim - margin  # [b, R] per (a, p)
    idx = jnp.maximum(_searchsorted_rows(s, t, "right"), first[:, None])
    count = (r - idx).astype(jnp.float32)
    pair = jnp.where(pos, jnp.take_along_axis(suffix, idx, axis=1) - count * t, 0.0)
    n_active = jnp.sum(jnp.where(pos, count, 0.0))
  else:
    idx = _searchsorted_rows(s, sim, "left") - 1  # largest negative < S_ap
    ok = idx >= first[:, None]
    idx = jnp.where(ok, idx, jnp.minimum(first, r - 1)[:, None])
    s_an = jnp.take_along_axis(s, idx, axis=1)
    has_neg = jnp.any(neg, axis=1)
    pair = jnp.where(pos & has_neg[:, None], jax.nn.relu(s_an - sim + margin), 0.0)
    n_active = jnp.sum(pair > 0)
  pos_act = pos & (pair > 0)
  neg_act = neg & (sim > (jnp.max(jnp.where(pos_act, sim, -2.0), axis=1, keepdims=True) - margin))
  return c, jnp.sum(pair, axis=1), n_active, pos_act, neg_act


def triplet(
  query,
  reference,
  *,
  margin: float = 0.1,
  mining: str = "hard",
  pos_threshold: Optional[float] = None,
  self_exclusion: str = "similarity",
  self_index=None,
  reduction: str = "paper",
  return_stats: bool = False,
  axis_name: Optional[str] = None,
):
  """Hinge triplet loss on cosine similarity: relu(S_an - S_ap + margin).

  mining:
    "hard": per anchor, its least similar positive and most similar negative.
    "semihard": per (anchor, positive), the most similar negative with
      S_an < S_ap (FaceNet); if there is none, the least similar negative.
    "all": every (anchor, positive, negative) triplet.
  "semihard" and "all" never build the `[B, R, R]` cube: negatives are sorted
  once per anchor and each (a, p) pair is resolved by binary search, so the
  cost is O(B R log R) and a full memory is affordable. With a split reference
  they first bring each device its anchors' whole rows (all_to_all, `[b, R]`).
  """
  if mining not in ("hard", "semihard", "all"):
    raise ValueError(f"mining must be 'hard', 'semihard' or 'all'; got {mining!r}")
  c = _score(query, reference, axis_name, self_exclusion, pos_threshold, self_index, reduction)
  if mining == "hard":
    c, per_anchor, n_active, pos_act, neg_act = _triplet_hard(c, margin)
  else:
    c, per_anchor, n_active, pos_act, neg_act = _triplet_sorted(c, margin, mining)
  loss = _reduce(c, per_anchor, n_active, reduction)
  return (loss, _stats(c, pos_act, neg_act)) if return_stats else loss


LOSSES: dict[str, Callable] = {
  "contrastive": contrastive,
  "multi_similarity": multi_similarity,
  "triplet": triplet,
}


def get(name: str) -> Callable:
  """The loss function called `name`; a clear error lists the valid ones."""
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; valid: {sorted(LOSSES)}")
  return LOSSES[name]


def xbm_total_loss(
  query,
  batch,
  mem,
  *,
  step,
  start_step,
  weight=1.0,
  loss: Union[str, Callable] = "contrastive",
  axis_name: Optional[str] = None,
  enqueue: bool = True,
  batch_self_index=None,
  memory_self_index=None,
  query_offset=None,
  memory_loss_kwargs: Optional[dict] = None,
  **loss_kwargs,
):
  """XBM's objective for one step: enqueue first, then L(Q, B) + w * L(Q, M).

  Where `memory.active(step, start_step)` (the one start rule; both may be
  traced) the detached batch is enqueued into `mem` before the losses, so the
  memory term also sees the current batch, as in the reference. Before it, the memory is left
  untouched and its term is weighted by 0 — chosen with `jnp.where`, so one
  compiled step serves the whole run.

  Args:
    query: anchors (the local batch under data parallelism), `[Bq, D]`.
    batch: the (gathered, global) batch `[B, D]`; the in-batch term sends
      gradient to both sides.
    mem: a `MemoryState` (whole on every device), or with `axis_name` this
      device's shard of a memory split over that mesh axis
      (`xbm_jax.sharded_memory`; call inside shard_map): each device then
      enqueues its own `query` into its own shard.
    step, start_step: ints or `[]` int arrays. weight: float or `[]` array.
    loss: a name of `LOSSES`, or any pair loss with their calling convention
      (`loss(query, reference, *, return_stats=True, self_index=..., **kw)` ->
      `(value, stats)`, plus `axis_name=` for a sharded memory): a user's own
      pair loss gets the memory this way.
    enqueue: False if the caller enqueued already.
    batch_self_index / memory_self_index: `self_index` for each term when
      `self_exclusion="index"`; defaults: the anchors' rows in `batch` and
      their slots in this enqueue, known when `query` is the whole batch, when
      `query_offset` (its first row in `batch`, e.g. `axis_index * b` for a
      local slice of a gathered batch) is given, or under `axis_name`.
    memory_loss_kwargs: overrides of `loss_kwargs` for the memory term only,
      e.g. `{"reduction": "mean"}` to average it over its active pairs.
  Returns:
    `(loss, new_mem, aux)` with aux = {"loss_batch", "loss_xbm", "xbm_weight",
    "batch/<stat>", "xbm/<stat>"}.
  """
  loss_fn = get(loss) if isinstance(loss, str) else loss
  active = memory_lib.active(jnp.asarray(step), jnp.asarray(start_step))
  mem_kwargs = {**loss_kwargs, **(memory_loss_kwargs or {})}
  b = query.emb.shape[0]
  if axis_name is not None:
    if enqueue:
      mem = sharded_memory.enqueue_local(mem, query, when=active)
    own_rows = jax.lax.axis_index(axis_name) * b + jnp.arange(b, dtype=jnp.int32)
    last_slots = lambda: sharded_memory.local_last_slots(mem, b, axis_name=axis_name)
    mem_extra = {"axis_name": axis_name}
  else:
    if enqueue:
      mem = memory_lib.enqueue(mem, batch, when=active)
    n = batch.emb.shape[0]
    if query_offset is None and b == n:
      query_offset = 0
    own_rows = None if query_offset is None else query_offset + jnp.arange(b, dtype=jnp.int32)
    last_slots = lambda: None if own_rows is None else memory_lib.last_slots(mem, n)[own_rows]
    mem_extra = {}
  if loss_kwargs.get("self_exclusion") == "index" and batch_self_index is None:
    batch_self_index = own_rows
  if mem_kwargs.get("self_exclusion") == "index" and memory_self_index is None:
    memory_self_index = last_slots()
  loss_b, stats_b = loss_fn(
    query, batch, return_stats=True, self_index=batch_self_index, **loss_kwargs
  )
  loss_m, stats_m = loss_fn(
    query, mem, return_stats=True, self_index=memory_self_index, **mem_extra, **mem_kwargs
  )
  total, aux = combine_terms(loss_b, stats_b, loss_m, stats_m, active=active, weight=weight)
  return total, mem, aux


def combine_terms(loss_b, stats_b, loss_m, stats_m, *, active, weight):
  """`(L_B + w * L_M, aux)` with w = weight where `active`, else 0 (traced)."""
  w = jnp.where(active, jnp.asarray(weight, jnp.float32), 0.0)
  aux = {"loss_batch": loss_b, "loss_xbm": loss_m, "xbm_weight": w}
  aux.update({f"batch/{k}": v for k, v in stats_b.items()})
  aux.update({f"xbm/{k}": v for k, v in stats_m.items()})
  return loss_b + w * loss_m, aux
