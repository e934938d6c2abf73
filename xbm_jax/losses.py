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
    `arange(B)` for the in-batch term). "id": drop every reference entry of the
    anchor's own image, by image id (`Embeddings.ids`, and a memory made with
    `memory.init(..., ids=True)`): its current slot and its older copies (other
    augmentations of the same image enqueued at earlier steps), which "similarity"
    and "index" keep as positives. "none": keep every same-label pair.
  reduction: "paper" (default): the sum over anchors of each anchor's loss,
    divided by the number of valid anchors |A| (the reference's `/ batch_size`).
    "mean": the sum divided by the number of active pairs (contrastive: pairs
    contributing a non-zero term; triplet: active triplets; multi-similarity:
    anchors with mined pairs).
  data_axis: None (default), or the mesh axis (or tuple) the anchors are split
    over in a data-parallel step: both counts are then taken over the whole
    batch (psum) and each device returns its share scaled so that the mean
    over the axis (the `pmean` a step applies to its loss and gradients) is
    exactly the whole batch's loss, whatever the device count.
  denominator: a `[]` count to divide by instead (the whole step's, e.g. over
    micro-batches; with `data_axis`, over all devices).
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

Your own loss: write it once with `xbm_jax.pairs.pair_loss` (one anchor's row)
or `xbm_jax.pairs.reduction_loss` (cross-shard reductions, as the built-ins
below) and it takes all of the above; `resolve("mypkg.losses:my_loss")` finds
it by import path.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, Union

import jax
import jax.numpy as jnp

from xbm_jax import embeddings, fused, memory as memory_lib, pairs
from xbm_jax.pairs import (  # noqa: F401  (re-exported: the public names of this module)
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

sg = jax.lax.stop_gradient

_SENTINEL = -4.0  # below any cosine similarity; marks masked-out negatives when sorted


def _contrastive_plain(rows: Rows, *, margin: float = 0.5) -> AnchorLoss:
  """XBM's contrastive loss (paper Eq. 4 as coded).

  L(A, R) = 1/|A| sum_i [ sum_{y_j = y_i, S_ij < 1-eps} (1 - S_ij)
                          + sum_{y_j != y_i, S_ij > margin} S_ij ]

  Args:
    query: anchors, emb `[B, D]`, labels `[B]`, optional valid `[B]`.
    reference: emb `[R, D]`, labels `[R]`, optional valid `[R]` (a batch or memory);
      with `axis_name`, this device's slice of a reference split over that mesh axis
      (call inside shard_map; see the module doc).
  Returns:
    `[]` float32 loss (and a stats dict if `return_stats`). Against a memory it
    is computed in one pass over the similarities with a custom VJP
    (`xbm_jax.fused`; the memory gets no gradient); `contrastive_plain` is the
    same loss through plain autodiff.
  """
  neg_active = rows.neg & (sg(rows.sim) > margin)
  loss = rows.sum(1.0 - rows.sim, rows.pos) + rows.sum(rows.sim, neg_active)
  return AnchorLoss(loss, rows.count(rows.pos) + rows.count(neg_active), rows.pos, neg_active)


def _fast_inputs(query, reference, *, axis_name, self_exclusion, pos_threshold, self_index, static):
  """`(Prepared, fused.Rule, fused.Pairs)` for the one-pass forms of `xbm_jax.fused`,
  or None where the plain form runs: a reference that is not a memory (a batch:
  small, and it gets a gradient), an empty one, or traced settings (`static`)."""
  numbers = (float, int)
  if not all(isinstance(x, numbers) for x in static):
    return None
  if not isinstance(pos_threshold, (type(None),) + numbers):
    return None
  if not isinstance(reference, memory_lib.MemoryState) or reference.emb.shape[0] == 0:
    return None
  p = pairs.prepare(
    query, reference, axis_name=axis_name, self_exclusion=self_exclusion, self_index=self_index
  )
  q, n_ref = p.query, reference.emb.shape[0]
  if q.emb.shape[-1] != reference.emb.shape[-1]:
    raise ValueError(
      f"query dim {q.emb.shape[-1]} does not match reference dim {reference.emb.shape[-1]}"
    )
  q_key = r_key = jnp.zeros((), jnp.int32)
  rule, threshold = {"similarity": "similarity", "none": "none"}.get(self_exclusion, "key"), 0.0
  if self_exclusion == "similarity":
    threshold = self_threshold(q, reference) if pos_threshold is None else pos_threshold
  elif self_exclusion == "index":
    q_key, r_key = p.self_index.astype(jnp.int32), jnp.arange(n_ref, dtype=jnp.int32)
  elif self_exclusion == "id":
    pairs.check_ids(q, reference)
    q_key, r_key = q.ids, reference.ids
  sides = fused.Pairs(
    q.labels,
    reference.labels,
    embeddings.valid_mask(q),
    embeddings.valid_mask(reference),
    jnp.broadcast_to(q_key, q.labels.shape),
    jnp.broadcast_to(r_key, reference.labels.shape),
  )
  return p, fused.Rule(rule, float(threshold), fused.CHUNK), sides


def _finish(p, axis_name, loss, active, pos, neg):
  """The `fast` result (see `pairs._make_loss`) from `[G]` per-row values: the
  loss, active counts and (count, similarity sum) of the pairs in each statistic."""
  own = lambda x: x if axis_name is None else jax.lax.dynamic_slice_in_dim(x, p.start, p.b)
  valid = p.local_valid
  stats = {}
  for kind, (count, total) in (("pos", pos), ("neg", neg)):
    n = jnp.sum(jnp.where(valid, own(count), 0.0))
    stats[f"{kind}_pairs"] = n.astype(jnp.int32)
    stats[f"mean_{kind}_sim"] = jnp.sum(jnp.where(valid, sg(own(total)), 0.0)) / jnp.maximum(n, 1)
  return own(loss), own(active), valid, stats


def _contrastive_fast(
  query, reference, *, axis_name, self_exclusion, pos_threshold, self_index, margin=0.5
):
  """contrastive through `fused.contrastive_rows` (same values; see `_make_loss`)."""
  ready = _fast_inputs(
    query,
    reference,
    axis_name=axis_name,
    self_exclusion=self_exclusion,
    pos_threshold=pos_threshold,
    self_index=self_index,
    static=(margin,),
  )
  if ready is None:
    return None
  p, rule, sides = ready
  sums = fused.contrastive_rows(rule, float(margin), p.query.emb, reference.emb, sides)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  loss, n_pos, n_neg, s_pos, s_neg = sums
  active = (n_pos + n_neg).astype(jnp.int32)
  return _finish(p, axis_name, loss, active, (n_pos, s_pos), (n_neg, s_neg))


contrastive = reduction_loss(_contrastive_plain, fast=_contrastive_fast)
contrastive.__name__ = contrastive.__qualname__ = "contrastive"
contrastive_plain = reduction_loss(_contrastive_plain)
contrastive_plain.__name__ = contrastive_plain.__qualname__ = "contrastive_plain"


def _multi_similarity_plain(
  rows: Rows,
  *,
  alpha: float = 2.0,
  beta: float = 40.0,
  lam: float = 0.5,
  mining_margin: float = 0.1,
) -> AnchorLoss:
  """Multi-similarity loss (Wang et al., CVPR 2019) with its pair mining, as coded
  in the XBM reference.

  Per anchor: keep negatives with S + margin > min positive S, positives with
  S - margin < max negative S; anchors lacking either contribute 0; else
    1/alpha log(1 + sum_pos exp(-alpha (S - lam))) + 1/beta log(1 + sum_neg exp(beta (S - lam))).
  """
  s = sg(rows.sim)
  min_pos = rows.across(jax.lax.pmin, jnp.min(jnp.where(rows.pos, s, jnp.inf), axis=1))
  max_neg = rows.across(jax.lax.pmax, jnp.max(jnp.where(rows.neg, s, -jnp.inf), axis=1))
  neg_keep = rows.neg & (s + mining_margin > min_pos[:, None])
  pos_keep = rows.pos & (s - mining_margin < max_neg[:, None])
  has = (rows.count(neg_keep) > 0) & (rows.count(pos_keep) > 0)  # [G]
  pos_term = rows.log1p_sum_exp(-alpha * (rows.sim - lam), pos_keep) / alpha
  neg_term = rows.log1p_sum_exp(beta * (rows.sim - lam), neg_keep) / beta
  loss = jnp.where(has, pos_term + neg_term, 0.0)
  return AnchorLoss(loss, has.astype(jnp.int32), pos_keep & has[:, None], neg_keep & has[:, None])


def _multi_similarity_fast(
  query,
  reference,
  *,
  axis_name,
  self_exclusion,
  pos_threshold,
  self_index,
  alpha=2.0,
  beta=40.0,
  lam=0.5,
  mining_margin=0.1,
):
  """multi_similarity through `fused.scan_extremes` and `fused.ms_rows` (same values)."""
  settings = fused.MS(alpha, beta, lam, mining_margin)
  ready = _fast_inputs(
    query,
    reference,
    axis_name=axis_name,
    self_exclusion=self_exclusion,
    pos_threshold=pos_threshold,
    self_index=self_index,
    static=settings,
  )
  if ready is None:
    return None
  p, rule, sides = ready
  settings = fused.MS(*(float(x) for x in settings))
  q, r = p.query.emb, reference.emb
  kept, (min_pos, _, max_neg, _) = fused.scan_extremes(rule, q, r, sides, ties=False)
  if axis_name is not None:
    min_pos, max_neg = jax.lax.pmin(min_pos, axis_name), jax.lax.pmax(max_neg, axis_name)
  # The log-sum-exp stabilisers of the plain form: the largest exponent over the
  # mined pairs (the least similar positive / most similar negative, when mined), or 0.
  m_pos = jnp.where(
    min_pos - mining_margin < max_neg, jnp.maximum(-alpha * (min_pos - lam), 0.0), 0.0
  )
  m_neg = jnp.where(
    max_neg + mining_margin > min_pos, jnp.maximum(beta * (max_neg - lam), 0.0), 0.0
  )
  extremes = jnp.stack([min_pos, max_neg, m_pos, m_neg])
  sums, counts = fused.ms_rows(rule, settings, q, r, sides, kept, extremes)
  if axis_name is not None:
    sums, counts = jax.lax.psum((sums, counts), axis_name)
  (e_pos, e_neg, s_pos, s_neg), (n_pos, n_neg) = sums, counts
  has = (n_neg > 0) & (n_pos > 0)
  pos_term = (m_pos + jnp.log(jnp.exp(-m_pos) + e_pos)) / alpha
  neg_term = (m_neg + jnp.log(jnp.exp(-m_neg) + e_neg)) / beta
  loss = jnp.where(has, pos_term + neg_term, 0.0)
  mined = lambda x: jnp.where(has, x, 0)
  return _finish(
    p,
    axis_name,
    loss,
    has.astype(jnp.int32),
    (mined(n_pos), mined(s_pos)),
    (mined(n_neg), mined(s_neg)),
  )


multi_similarity = reduction_loss(_multi_similarity_plain, fast=_multi_similarity_fast)
multi_similarity.__name__ = multi_similarity.__qualname__ = "multi_similarity"
multi_similarity_plain = reduction_loss(_multi_similarity_plain)
multi_similarity_plain.__name__ = multi_similarity_plain.__qualname__ = "multi_similarity_plain"


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


def _triplet_hard(rows: Rows, margin) -> AnchorLoss:
  has_both = (rows.count(rows.pos) > 0) & (rows.count(rows.neg) > 0)  # [G]
  hp = rows.min(rows.sim, rows.pos, fill=2.0)
  hn = rows.max(rows.sim, rows.neg, fill=-2.0)
  loss = jnp.where(has_both, jax.nn.relu(hn - hp + margin), 0.0)
  on = (sg(loss) > 0)[:, None]
  s = sg(rows.sim)
  pos_act = rows.pos & (s == sg(hp)[:, None]) & on
  neg_act = rows.neg & (s == sg(hn)[:, None]) & on
  return AnchorLoss(loss, (loss > 0).astype(jnp.int32), pos_act, neg_act)


def _triplet_sorted(rows: Rows, margin, mining) -> AnchorLoss:
  """ "semihard" / "all" on whole rows: negatives sorted once per anchor, each
  (a, p) pair resolved by binary search (never the [B, R, R] cube)."""
  rows = rows.whole()
  sim, pos, neg = rows.sim, rows.pos, rows.neg
  s, suffix, first = _sorted_negatives(sim, neg)
  r = sim.shape[1]
  if mining == "all":
    t = sim - margin  # [b, R] per (a, p)
    idx = jnp.maximum(_searchsorted_rows(s, t, "right"), first[:, None])
    count = (r - idx).astype(jnp.float32)
    pair = jnp.where(pos, jnp.take_along_axis(suffix, idx, axis=1) - count * t, 0.0)
    active = jnp.sum(jnp.where(pos, count, 0.0), axis=1)
  else:
    idx = _searchsorted_rows(s, sim, "left") - 1  # largest negative < S_ap
    ok = idx >= first[:, None]
    idx = jnp.where(ok, idx, jnp.minimum(first, r - 1)[:, None])
    s_an = jnp.take_along_axis(s, idx, axis=1)
    has_neg = jnp.any(neg, axis=1)
    pair = jnp.where(pos & has_neg[:, None], jax.nn.relu(s_an - sim + margin), 0.0)
    active = jnp.sum(pair > 0, axis=1)
  pos_act = pos & (pair > 0)
  neg_act = neg & (sim > (jnp.max(jnp.where(pos_act, sim, -2.0), axis=1, keepdims=True) - margin))
  return AnchorLoss(jnp.sum(pair, axis=1), active, pos_act, neg_act, rows)


TRIPLET_MINING = ("hard", "semihard", "all")


def _triplet_plain(rows: Rows, *, margin: float = 0.1, mining: str = "hard") -> AnchorLoss:
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
  if mining not in TRIPLET_MINING:
    raise ValueError(f"mining must be 'hard', 'semihard' or 'all'; got {mining!r}")
  return _triplet_hard(rows, margin) if mining == "hard" else _triplet_sorted(rows, margin, mining)


def _triplet_fast(
  query,
  reference,
  *,
  axis_name,
  self_exclusion,
  pos_threshold,
  self_index,
  margin=0.1,
  mining="hard",
):
  """triplet "hard" through `fused.scan_extremes` and `fused.extreme_grads` (same
  values); "semihard" and "all" sort whole rows: the plain form."""
  if mining != "hard":
    return None
  ready = _fast_inputs(
    query,
    reference,
    axis_name=axis_name,
    self_exclusion=self_exclusion,
    pos_threshold=pos_threshold,
    self_index=self_index,
    static=(margin,),
  )
  if ready is None:
    return None
  p, rule, sides = ready
  q, r = p.query.emb, reference.emb
  kept, (lo, n_lo, hi, n_hi) = fused.scan_extremes(rule, q, r, sides)
  if axis_name is not None:  # the extremes over all slices, ties counted on each
    best_lo, best_hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
    n_lo = jax.lax.psum(jnp.where(lo == best_lo, n_lo, 0.0), axis_name)
    n_hi = jax.lax.psum(jnp.where(hi == best_hi, n_hi, 0.0), axis_name)
    lo, hi = best_lo, best_hi
  zero = fused.extreme_grads(rule, q, r, sides, kept, jnp.stack([lo, n_lo, hi, n_hi]))
  if axis_name is not None:
    zero = jax.lax.psum(zero, axis_name)  # routes each anchor's gradient to every slice
  has_both = (n_lo > 0) & (n_hi > 0)
  hp = jnp.where(n_lo > 0, lo, 2.0) + zero[0]  # the plain form's fills where none
  hn = jnp.where(n_hi > 0, hi, -2.0) + zero[1]
  loss = jnp.where(has_both, jax.nn.relu(hn - hp + margin), 0.0)
  on = sg(loss) > 0
  hardest = lambda n, x: (jnp.where(on, n, 0.0), jnp.where(on, n * x, 0.0))
  return _finish(p, axis_name, loss, on.astype(jnp.int32), hardest(n_lo, lo), hardest(n_hi, hi))


triplet = reduction_loss(_triplet_plain, fast=_triplet_fast)
triplet.__name__ = triplet.__qualname__ = "triplet"
triplet_plain = reduction_loss(_triplet_plain)
triplet_plain.__name__ = triplet_plain.__qualname__ = "triplet_plain"


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


def resolve(loss: Union[str, Callable]) -> Callable:
  """A loss from a built-in name, an import path `"pkg.module:function"`, or itself.

  The function found by path may be a pair loss (`pairs.pair_loss` /
  `pairs.reduction_loss`) or a plain `f(query, reference, **options) -> []`.
  """
  if callable(loss):
    return loss
  if not isinstance(loss, str):
    raise TypeError(f"loss must be a name, 'pkg.module:function' or a function; got {loss!r}")
  if ":" not in loss:
    return get(loss)
  module_name, _, attr = loss.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"loss {loss!r}: cannot import module {module_name!r} ({e})") from e
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise ValueError(f"loss {loss!r}: module {module_name!r} has no function {attr!r}")
  return fn


def check_loss_options(loss: Union[str, Callable], options) -> Callable:
  """The resolved loss, after checking that it takes each of `options` (names) and
  `(query, reference)`; a TypeError naming the first it does not take."""
  fn = resolve(loss)
  options = list(options)
  if pairs.is_pair_loss(fn):
    pairs.check_options(fn.__name__, options, fn.options)
    return fn
  name = getattr(fn, "__name__", repr(fn))
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return fn  # a builtin or C function: nothing to check before calling it
  try:
    sig.bind(None, None, **{k: None for k in options})
  except TypeError as e:
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    bad = [k for k in options if k not in sig.parameters and not takes_kwargs]
    what = f"takes no option {bad[0]!r}" if bad else f"cannot be called as {name}(query, reference)"
    raise TypeError(f"loss {name} {what}: {e}") from None
  return fn


# The one-call objective lives in xbm_jax.objective; it is part of this module's API.
from xbm_jax.objective import combine_terms, xbm_total_loss  # noqa: E402, F401
