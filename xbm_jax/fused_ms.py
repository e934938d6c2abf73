"""Multi-similarity against the memory: ONE pass over it, plus its positives.

Mining needs each anchor's least similar positive (min_pos) before its
negatives can be mined (S + margin > min_pos), and its most similar negative
(max_neg) before its positives can (S - margin < max_neg). Both are whole-row
extremes, so a plain walk takes three passes over `[G, R]` (extremes, sums,
backward) and keeps S between them. Here:

1. `positive_rows` lists the memory rows whose label some valid anchor has
   (and a few more: a hashed table of the anchors' labels), from the labels
   alone, one table look-up a row. They are few
   (SOP: about 5 images a class, 16 classes a batch), so they are walked in
   gathered chunks of `fused.LIST_CHUNK` rows, not as blocks of the memory.
2. `least_similar_positive`: min_pos over those chunks.
3. `negative_sums` walks the memory once, in blocks of `fused.CHUNK` rows: each
   block's mined negatives add to a shifted exponential sum and to dq' = sum
   e r while the block is in cache, the shift being the largest exponent so
   far (the sum and dq' rescale when it grows, as flash attention does). The
   largest mined similarity is max_neg wherever a negative is mined; where
   none is, no positive is either (both need max_neg + margin > min_pos), and
   the anchor is inactive.
4. `positive_sums`: the same sums over the listed chunks, with max_neg known.

Each sum's backward only scales its dq' by the cotangent: no pass over the
memory, and S is never stored. Work: the two products of every memory row
(the floor) and one element-wise walk of each block, plus about two products
of each listed row; a memory whose labels the batch mostly shares (few
classes) thus costs up to twice the floor, still exact.

Exactness: each pair's exponent is computed as the plain form computes it
(`beta (S - lam)`, `-alpha (S - lam)`) and each shift is the exponent of the
extreme itself, so the sums differ from the plain form's by rounding only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from xbm_jax import fused
from xbm_jax.fused import HI, MS, Pairs, Rule


class Listed(NamedTuple):
  """The reference rows that are positives of some anchor, as `cum [R]` float32,
  the number of them among rows 0..j (exact below 2**24 rows), and their
  `count` (int32). The k-th listed row is the first j with cum[j] >= k."""

  cum: jax.Array
  count: jax.Array


class Sums(NamedTuple):
  """A mined set's per-anchor sums, `[G]` each: `ext` its extreme similarity
  (largest for negatives, least for positives; -inf / +inf where it is empty),
  `total` the sum of exp(x - x_ext) over it (x each pair's exponent, x_ext the
  extreme's), `count` (int32) and `s_sum` (its similarities)."""

  ext: jax.Array
  total: jax.Array
  count: jax.Array
  s_sum: jax.Array


def _chunk_size(rule: Rule, n_ref: int) -> int:
  return max(1, min(rule.list_chunk, n_ref))


WIDTH = 128  # a prefix count as [R / WIDTH, WIDTH] rows times a triangle of ones
HASH_BITS = 16  # slots of the anchors' label table: 2**16


def _slot(labels):
  """Each label's slot in a table of 2**HASH_BITS (multiplicative hashing)."""
  return (labels.astype(jnp.uint32) * jnp.uint32(2654435761)) >> (32 - HASH_BITS)


def positive_rows(rule: Rule, pairs: Pairs) -> Listed:
  """`Listed`: the valid reference rows whose label's slot in a table of the valid
  anchors' labels is taken. A superset of the rows that are some anchor's
  positives (a label sharing a slot adds rows that `pair_masks` then drops),
  at one gather per row instead of G compares. Their prefix count is a
  product with a triangle of ones (XLA:CPU's cumsum over the whole memory is
  slower) plus a cumsum over the R / WIDTH row totals."""
  n_ref = pairs.r_labels.shape[0]
  if n_ref >= fused.LOCATE_MAX:
    raise ValueError(f"a reference of {n_ref} rows: listed counts are exact below 2**24")
  slots = jnp.where(pairs.q_valid, _slot(pairs.q_labels), 1 << HASH_BITS)  # invalid: dropped
  table = jnp.zeros((1 << HASH_BITS,), jnp.float32).at[slots].set(1.0, mode="drop")
  hit = jnp.where(pairs.r_valid, table[_slot(pairs.r_labels)], 0.0)
  padded = -(-n_ref // WIDTH) * WIDTH
  rows = jnp.pad(hit, (0, padded - n_ref)).reshape(-1, WIDTH)
  within = jnp.matmul(rows, jnp.triu(jnp.ones((WIDTH, WIDTH), jnp.float32)), precision=HI)
  before = jnp.cumsum(within[:, -1]) - within[:, -1]
  cum = (within + before[:, None]).reshape(-1)[:n_ref]
  return Listed(cum, cum[-1].astype(jnp.int32))


def _chunk(rule: Rule, i, q, r, pairs: Pairs, listed: Listed):
  """Chunk i of the listed rows: `(S [G, c], pos [G, c], rows [c, D])`."""
  size = _chunk_size(rule, r.shape[0])
  rank = i * size + jnp.arange(size)
  at = jnp.minimum(jnp.searchsorted(listed.cum, (rank + 1).astype(jnp.float32)), r.shape[0] - 1)
  rows = jnp.take(r, at, axis=0)
  s = jnp.matmul(q, rows.T, precision=HI, preferred_element_type=jnp.float32).astype(jnp.float32)
  pos, _ = fused.pair_masks(rule, s, pairs, lambda x: jnp.take(x, at), rank < listed.count)
  return s, pos, rows


def _chunk_loop(rule: Rule, listed: Listed, inputs, body, init):
  """fori_loop over the listed chunks that hold rows (a traced count)."""
  size = _chunk_size(rule, inputs[1].shape[0])
  n = (listed.count + size - 1) // size
  return jax.lax.fori_loop(0, n, body, fused._vary_like(init, inputs))


def least_similar_positive(rule: Rule, q, r, pairs: Pairs, listed: Listed):
  """min_pos `[G]`: each anchor's least similar positive over the listed rows
  (+inf where it has none). No gradient (mining is piecewise constant)."""
  q, r = fused._f32(*jax.lax.stop_gradient((q, r)))

  def body(i, low):
    s, pos, _ = _chunk(rule, i, q, r, pairs, listed)
    return jnp.minimum(low, jnp.min(jnp.where(pos, s, jnp.inf), axis=1))

  return _chunk_loop(rule, listed, (q, r, pairs, listed), body, jnp.full(q.shape[:1], jnp.inf))


class _Side(NamedTuple):
  sign: float  # +1: the extreme is the largest S (negatives); -1: the least (positives)
  scale: float  # the exponent is scale * (S - lam): beta, or -alpha


def _add(side: _Side, lam: float, carry, s, keep, rows):
  """The online update of `(ext, total, dq', count, s_sum)` by one block's mined
  pairs `keep [G, C]` (ext kept as sign * S: a maximum either way)."""
  ext, total, g, count, s_sum = carry
  y = jnp.where(keep, side.sign * s, -jnp.inf)
  new = jnp.maximum(ext, jnp.max(y, axis=1))
  shift = lambda m: jnp.where(m > -jnp.inf, side.scale * (side.sign * m - lam), 0.0)
  rescale = jnp.where(ext > -jnp.inf, jnp.exp(shift(ext) - shift(new)), 0.0)
  e = jnp.exp(side.scale * (side.sign * y - lam) - shift(new)[:, None])  # 0 where not mined
  ones = jnp.ones((s.shape[1], 1), e.dtype)
  total = total * rescale + jnp.matmul(e, ones, precision=HI)[:, 0]  # a dot: faster than a sum
  g = g * rescale[:, None] + jnp.matmul(e, rows.astype(g.dtype), precision=HI)
  count = count + fused._row_sums(keep)[0].astype(jnp.int32)
  return new, total, g, count, s_sum + fused._row_sums(jnp.where(keep, s, 0.0))[0]


def _init(q, r):
  g = q.shape[0]
  zero = jnp.zeros((g,), jnp.float32)
  return jnp.full((g,), -jnp.inf), zero, fused._grad0(q, r), jnp.zeros((g,), jnp.int32), zero


def _finish(side: _Side, carry):
  ext, total, g, count, s_sum = carry
  return Sums(side.sign * ext, total, count, s_sum), g


def _negative_walk(rule: Rule, ms: MS, q, r, pairs: Pairs, min_pos):
  q, r = fused._f32(q, r)
  side = _Side(1.0, ms.beta)

  def body(i, carry):
    s, _, neg, rows = fused._block(rule, i, q, r, pairs)
    keep = neg & (s + ms.mining_margin > min_pos[:, None])  # the plain form's test
    return _add(side, ms.lam, carry, s, keep, rows)

  return _finish(side, fused._loop(rule, (q, r, pairs, min_pos), body, _init(q, r)))


def _positive_walk(rule: Rule, ms: MS, q, r, pairs: Pairs, max_neg, listed: Listed):
  q, r = fused._f32(q, r)
  side = _Side(-1.0, -ms.alpha)

  def body(i, carry):
    s, pos, rows = _chunk(rule, i, q, r, pairs, listed)
    keep = pos & (s - ms.mining_margin < max_neg[:, None])  # the plain form's test
    return _add(side, ms.lam, carry, s, keep, rows)

  inputs = (q, r, pairs, max_neg, listed)
  return _finish(side, _chunk_loop(rule, listed, inputs, body, _init(q, r)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def negative_sums(rule: Rule, ms: MS, q, r, pairs: Pairs, min_pos) -> Sums:
  """`Sums` of each anchor's mined negatives (S + margin > min_pos `[G]`) over
  the memory `r [R, D]`, in one walk. Gradient: to `q` through `total` only
  (the shift is the extreme's own exponent: any shift gives the same log-sum-exp)."""
  return _negative_walk(rule, ms, q, r, pairs, min_pos)[0]


def _negative_fwd(rule, ms, q, r, pairs, min_pos):
  sums, g = _negative_walk(rule, ms, q, r, pairs, min_pos)
  return sums, (g, jnp.zeros((0,), q.dtype), r, min_pos)  # [0]: q's dtype


def _negative_bwd(rule, ms, res, ct):
  g, q_like, r, bound = res
  dq = (ms.beta * ct.total)[:, None] * g  # d total / dS = beta e on mined pairs
  return dq.astype(q_like.dtype), jnp.zeros_like(r), None, jnp.zeros_like(bound)


negative_sums.defvjp(_negative_fwd, _negative_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def positive_sums(rule: Rule, ms: MS, q, r, pairs: Pairs, max_neg, listed: Listed) -> Sums:
  """`Sums` of each anchor's mined positives (S - margin < max_neg `[G]`) over the
  listed rows. Gradient: to `q` through `total` only."""
  return _positive_walk(rule, ms, q, r, pairs, max_neg, listed)[0]


def _positive_fwd(rule, ms, q, r, pairs, max_neg, listed):
  sums, g = _positive_walk(rule, ms, q, r, pairs, max_neg, listed)
  return sums, (g, jnp.zeros((0,), q.dtype), r, max_neg, listed)


def _positive_bwd(rule, ms, res, ct):
  g, q_like, r, bound, listed = res
  dq = (-ms.alpha * ct.total)[:, None] * g  # d total / dS = -alpha e on mined pairs
  del listed
  return dq.astype(q_like.dtype), jnp.zeros_like(r), None, jnp.zeros_like(bound), None


positive_sums.defvjp(_positive_fwd, _positive_bwd)
