"""The built-in pair losses (contrastive, multi-similarity, triplet) and their registry.

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

Your own loss: write it once with `xbm_jax.losses.pairs.pair_loss` (one anchor's row)
or `xbm_jax.losses.pairs.reduction_loss` (cross-shard reductions, as the built-ins
below) and it takes all of the above; `resolve("mypkg.losses:my_loss")` finds
it by import path.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable, Union

import jax
import jax.numpy as jnp

from xbm_jax.losses.fused import terms as fused_losses
from xbm_jax.losses import pairs
from xbm_jax.losses.pairs import AnchorLoss, Rows, reduction_loss

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
    is computed in one pass over blocks of the memory with a custom VJP
    (`xbm_jax.losses.fused.blocks`; the memory gets no gradient); `contrastive_plain` is the
    same loss through plain autodiff.
  """
  neg_active = rows.neg & (sg(rows.sim) > margin)
  loss = rows.sum(1.0 - rows.sim, rows.pos) + rows.sum(rows.sim, neg_active)
  return AnchorLoss(loss, rows.count(rows.pos) + rows.count(neg_active), rows.pos, neg_active)


contrastive = reduction_loss(_contrastive_plain, fast=fused_losses.contrastive)
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
  in the XBM reference. Against a memory it walks the memory once, after its
  listed positives (`xbm_jax.losses.fused.ms`); `multi_similarity_plain` is the same
  loss through plain autodiff.

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


multi_similarity = reduction_loss(_multi_similarity_plain, fast=fused_losses.multi_similarity)
multi_similarity.__name__ = multi_similarity.__qualname__ = "multi_similarity"
multi_similarity_plain = reduction_loss(_multi_similarity_plain)
multi_similarity_plain.__name__ = multi_similarity_plain.__qualname__ = "multi_similarity_plain"


def _supcon_plain(rows: Rows, *, temperature: float = 0.1) -> AnchorLoss:
  """Supervised InfoNCE (SupCon's L_out, Khosla et al. 2020; MoCo's InfoNCE with labels),
  the softmax over every reference row but the anchor's own.

  Per anchor with a positive: log sum_{a in pos | neg} exp(S_a / t) - mean_{p in pos} S_p / t;
  anchors without one contribute 0 (`reduction="mean"` averages over the anchors with a
  positive). The log-sum-exp is shifted by the row maximum (complete across shards, no
  gradient), so a sharded memory gives exactly the replicated value and gradient.
  """
  logits = rows.sim / temperature
  cand = rows.pos | rows.neg
  shift = sg(rows.max(logits, cand))  # [G]
  scaled = jnp.exp(jnp.where(cand, logits - shift[:, None], -jnp.inf))
  lse = shift + jnp.log(jnp.maximum(rows.sum(scaled, cand), jnp.finfo(jnp.float32).tiny))
  n_pos = rows.count(rows.pos)
  has = n_pos > 0
  mean_pos = rows.sum(logits, rows.pos) / jnp.maximum(n_pos, 1)
  loss = jnp.where(has, lse - mean_pos, 0.0)
  return AnchorLoss(loss, has.astype(jnp.int32), rows.pos & has[:, None], rows.neg & has[:, None])


supcon = reduction_loss(_supcon_plain)
supcon.__name__ = supcon.__qualname__ = "supcon"


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
  "hard" against a memory runs in two passes over blocks of the memory
  (`xbm_jax.losses.fused.blocks`); `triplet_plain` is the same loss through plain autodiff.
  """
  if mining not in TRIPLET_MINING:
    raise ValueError(f"mining must be 'hard', 'semihard' or 'all'; got {mining!r}")
  return _triplet_hard(rows, margin) if mining == "hard" else _triplet_sorted(rows, margin, mining)


triplet = reduction_loss(_triplet_plain, fast=fused_losses.triplet)
triplet.__name__ = triplet.__qualname__ = "triplet"
triplet_plain = reduction_loss(_triplet_plain)
triplet_plain.__name__ = triplet_plain.__qualname__ = "triplet_plain"


LOSSES: dict[str, Callable] = {
  "contrastive": contrastive,
  "multi_similarity": multi_similarity,
  "triplet": triplet,
  "supcon": supcon,
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
  if isinstance(loss, functools.partial) and not loss.args and pairs.is_pair_loss(loss.func):
    return pairs.bind(loss.func, **loss.keywords)  # keeps statistics and the sharded path
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


def bind(loss: Union[str, Callable], **options) -> Callable:
  """`loss` (a name, an import path or a function) with `options` fixed, as one value.

  A pair loss stays a pair loss (`pairs.bind`: statistics, the sharded memory, the
  library's options); a plain `f(query, reference, **options)` becomes a
  `functools.partial` after its options are checked against its signature.
  """
  fn = check_loss_options(loss, options)
  if pairs.is_pair_loss(fn):
    return pairs.bind(fn, **options)
  return functools.partial(fn, **options) if options else fn


def bound_options(loss: Callable) -> dict:
  """The options fixed in a bound loss (`bind`, `functools.partial`); {} for a bare one."""
  if isinstance(loss, functools.partial):
    return dict(loss.keywords)
  return dict(getattr(loss, "bound_options", {}))
