"""The built-in losses against a memory through `xbm_jax.losses.fused.blocks` (their fast forms).

Each function here takes a loss's inputs and options as `pairs._make_loss`
passes them to `fast=` and returns `(per-anchor loss [b], active [b], local
valid [b], statistics)` with the same values, statistics and gradient as the
plain form (`losses.*_plain`), or None where the plain form runs instead: a
reference that is not a memory (a batch: small, and it gets a gradient), an
empty one, traced settings, or triplet "semihard" / "all" (sorted whole rows).
Split references (`axis_name`) combine the per-anchor results across slices
here, as `scoring.Rows` does for the plain form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xbm_jax import embeddings, memory as memory_lib
from xbm_jax.losses.fused import blocks as fused
from xbm_jax.losses.fused import ms as fused_ms
from xbm_jax.losses.fused import triplet as fused_triplet
from xbm_jax.losses import pairs
from xbm_jax.losses.scoring import self_threshold

sg = jax.lax.stop_gradient


def _inputs(query, reference, *, axis_name, self_exclusion, pos_threshold, self_index, static):
  """`(Prepared, fused.Rule, fused.Pairs)` for the one-pass forms of `xbm_jax.losses.fused.blocks`,
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
  return p, fused.Rule(rule, float(threshold), fused.CHUNK, fused.LIST_CHUNK), sides


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


def contrastive(
  query, reference, *, axis_name, self_exclusion, pos_threshold, self_index, margin=0.5
):
  """contrastive through `fused.contrastive_rows` (same values; see `_make_loss`)."""
  ready = _inputs(
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
  if axis_name is not None:  # one psum each: XLA drops those of unread statistics
    sums = tuple(jax.lax.psum(x, axis_name) for x in sums)
  loss, n_pos, n_neg, s_pos, s_neg = sums
  active = (n_pos + n_neg).astype(jnp.int32)
  return _finish(p, axis_name, loss, active, (n_pos, s_pos), (n_neg, s_neg))


def multi_similarity(
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
  """multi_similarity through `xbm_jax.losses.fused.ms` (same values)."""
  settings = fused.MS(alpha, beta, lam, mining_margin)
  ready = _inputs(
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
  ms = fused.MS(*(float(x) for x in settings))
  q, r = p.query.emb, reference.emb
  listed = fused_ms.positive_rows(rule, q, r, sides)
  min_pos = fused_ms.least_similar_positive(rule, q, r, sides, listed)
  if axis_name is not None:
    min_pos = jax.lax.pmin(min_pos, axis_name)
  neg = fused_ms.negative_sums(rule, ms, q, r, sides, min_pos)
  # -inf where no negative is mined: then no positive is either (see fused_ms).
  max_neg = neg.ext if axis_name is None else jax.lax.pmax(sg(neg.ext), axis_name)
  # The plain form's log-sum-exp stabilisers: the largest exponent over the mined
  # pairs (the least similar positive / most similar negative, when mined), or 0.
  m_pos = jnp.where(
    min_pos - mining_margin < max_neg, jnp.maximum(-alpha * (min_pos - lam), 0.0), 0.0
  )
  m_neg = jnp.where(
    max_neg + mining_margin > min_pos, jnp.maximum(beta * (max_neg - lam), 0.0), 0.0
  )
  pos = fused_ms.positive_sums(rule, ms, q, r, sides, jnp.stack([max_neg, m_pos]), listed)
  # Sums of exp(x - m) over each set: the negatives' re-shifted from their extreme's x.
  reshift = jnp.exp(fused_ms.negative_exponent(ms, neg.ext) - m_neg)
  e_sums = jnp.stack([pos.total, neg.total * jnp.where(neg.ext > -jnp.inf, reshift, 0.0)])
  stats = (pos.count, pos.s_sum, neg.count, neg.s_sum)
  if axis_name is not None:
    # One psum each: XLA drops those of unread statistics (and their loop carries).
    e_sums, stats = jax.lax.psum(e_sums, axis_name), [jax.lax.psum(x, axis_name) for x in stats]
  (e_pos, e_neg), (n_pos, s_pos, n_neg, s_neg) = e_sums, stats
  # Both sets mine a pair iff their extremes do (the same tests as the stabilisers').
  has = (min_pos - mining_margin < max_neg) & (max_neg + mining_margin > min_pos)
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


def triplet(
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
  """triplet "hard" through `fused.scan_extremes` and `fused_triplet.hardest_grads` (same
  values); "semihard" and "all" sort whole rows: the plain form."""
  if mining != "hard":
    return None
  ready = _inputs(
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
  lo, n_lo, hi, n_hi, at_lo, at_hi = fused.scan_extremes(rule, q, r, sides)
  located = jnp.stack([lo, at_lo, hi, at_hi])  # this slice's extremes and their rows
  if axis_name is not None:  # the extremes over all slices, ties counted on each
    best_lo, best_hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
    n_lo = jax.lax.psum(jnp.where(lo == best_lo, n_lo, 0.0), axis_name)
    n_hi = jax.lax.psum(jnp.where(hi == best_hi, n_hi, 0.0), axis_name)
    lo, hi = best_lo, best_hi
  zero = fused_triplet.hardest_grads(rule, q, r, sides, jnp.stack([lo, n_lo, hi, n_hi]), located)
  if axis_name is not None:
    zero = jax.lax.psum(zero, axis_name)  # routes each anchor's gradient to every slice
  has_both = (n_lo > 0) & (n_hi > 0)
  hp = jnp.where(n_lo > 0, lo, 2.0) + zero[0]  # the plain form's fills where none
  hn = jnp.where(n_hi > 0, hi, -2.0) + zero[1]
  loss = jnp.where(has_both, jax.nn.relu(hn - hp + margin), 0.0)
  on = sg(loss) > 0
  hardest = lambda n, x: (jnp.where(on, n, 0.0), jnp.where(on, n * x, 0.0))
  return _finish(p, axis_name, loss, on.astype(jnp.int32), hardest(n_lo, lo), hardest(n_hi, hi))
