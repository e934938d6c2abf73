"""Multi-similarity against the memory: ONE pass over it, plus its positives.

Mining needs each anchor's least similar positive (min_pos) before its
negatives can be mined (S + margin > min_pos), and its most similar negative
(max_neg) before its positives can (S - margin < max_neg). Both are whole-row
extremes, so a plain walk takes three passes over `[G, R]` (extremes, sums,
backward) and keeps S between them. Here:

1. `positive_rows` lists the memory rows whose label some valid anchor has
   (and a few more: a hashed table of the anchors' labels), from the labels
   alone, one table look-up a row. They are few (SOP: about 5 images a class,
   16 classes a batch), so they are walked in gathered chunks (the first of
   `fused.LIST_CHUNK` rows, any later ones of `fused.CHUNK`), not as blocks
   of the memory.
2. `least_similar_positive`: min_pos over those chunks.
3. `negative_sums` walks the memory once, in blocks of `fused.CHUNK` rows: each
   block's mined negatives add to a shifted exponential sum and to dq' = sum
   e r while the block is in cache, the shift being the largest exponent so
   far (the sum and dq' rescale when it grows, as flash attention does). The
   largest mined similarity is max_neg wherever a negative is mined; where
   none is, no positive is either (both need max_neg + margin > min_pos), and
   the anchor is inactive.
4. `positive_sums`: the same sums over the listed chunks, with max_neg known and
   the plain form's shift (the least similar positive's exponent) known too.

Each sum's backward only scales its dq' by the cotangent: no pass over the
memory, and S is never stored. Work: the two products of every memory row
(the floor) and one element-wise walk of each block, plus about two products
of each listed row: a memory whose labels the batch mostly shares (few
classes) costs up to two products more, still exact.

Exactness: each pair's exponent is computed as the plain form computes it
(`beta (S - lam)`, `-alpha (S - lam)`), the mining tests are the plain form's,
and each shift is an extreme's own exponent (the positives' the plain form's
stabiliser), so the sums differ from the plain form's by rounding only.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from xbm_jax.losses.fused import blocks as fused
from xbm_jax.losses.fused.blocks import HI, MS, Pairs, Rule


class Listed(NamedTuple):
  """The reference rows that are positives of some anchor, as `cum [R]` float32,
  the number of them among rows 0..j (exact below 2**24 rows), and their
  `count` (int32). The k-th listed row is the first j with cum[j] >= k. The
  first chunk (`_chunk` 0: often the only one) is kept, made once for both walks
  of the positives: `s0 [G, c]` (no gradient), `pos0 [G, c]`, `rows0 [c, D]`."""

  cum: jax.Array
  count: jax.Array
  s0: jax.Array
  pos0: jax.Array
  rows0: jax.Array


class Sums(NamedTuple):
  """A mined set's per-anchor sums, `[G]` each: `ext` (negatives) its largest
  similarity (-inf where it is empty), `total` the sum of exp(x - shift) over
  it (x each pair's exponent), `count` (int32) and `s_sum` (its similarities)."""

  ext: jax.Array
  total: jax.Array
  count: jax.Array
  s_sum: jax.Array


def _chunk_sizes(rule: Rule, n_ref: int) -> tuple[int, int]:
  """Rows of the first listed chunk and of each later one: the first is small
  (SOP-like labels list few rows), the later ones as large as a block (few
  classes list many: a large chunk amortises its search and product)."""
  first = max(1, min(rule.list_chunk, n_ref))
  return first, max(first, min(rule.chunk, n_ref))


WIDTH = 128  # a prefix count as [R / WIDTH, WIDTH] rows times a triangle of ones
HASH_BITS = 16  # slots of the anchors' label table: 2**16


def _slot(labels):
  """Each label's slot in a table of 2**HASH_BITS (multiplicative hashing)."""
  return (labels.astype(jnp.uint32) * jnp.uint32(2654435761)) >> (32 - HASH_BITS)


def positive_rows(rule: Rule, q, r, pairs: Pairs) -> Listed:
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
  count = cum[-1].astype(jnp.int32)
  q, r = fused._f32(*jax.lax.stop_gradient((q, r)))
  return Listed(cum, count, *_chunk(rule, 0, q, r, pairs, Listed(cum, count, *[None] * 3)))


def _chunk(rule: Rule, i, q, r, pairs: Pairs, listed: Listed):
  """Chunk i of the listed rows: `(S [G, c], pos [G, c], rows [c, D])`."""
  first, later = _chunk_sizes(rule, r.shape[0])
  if isinstance(i, int) and i == 0:
    rank = jnp.arange(first)
  else:
    rank = first + (i - 1) * later + jnp.arange(later)
  at = jnp.searchsorted(listed.cum, (rank + 1).astype(jnp.float32), method="scan")
  at = jnp.minimum(at, r.shape[0] - 1)
  rows = jnp.take(r, at, axis=0)
  s = jnp.matmul(q, rows.T, precision=HI, preferred_element_type=jnp.float32).astype(jnp.float32)
  pos, _ = fused.pair_masks(rule, s, pairs, lambda x: jnp.take(x, at), rank < listed.count)
  return s, pos, rows


def _chunk_loop(rule: Rule, listed: Listed, inputs, body, init):
  """fori_loop over the listed chunks after the first that hold rows (a traced
  count; usually none)."""
  first, later = _chunk_sizes(rule, inputs[1].shape[0])
  n = 1 + (jnp.maximum(listed.count - first, 0) + later - 1) // later
  return jax.lax.fori_loop(1, n, body, fused._vary_like(init, inputs))


def least_similar_positive(rule: Rule, q, r, pairs: Pairs, listed: Listed):
  """min_pos `[G]`: each anchor's least similar positive over the listed rows
  (+inf where it has none). No gradient (mining is piecewise constant)."""
  q, r = fused._f32(*jax.lax.stop_gradient((q, r)))

  least = lambda s, pos: jnp.min(jnp.where(pos, s, jnp.inf), axis=1)

  def body(i, low):
    return jnp.minimum(low, least(*_chunk(rule, i, q, r, pairs, listed)[:2]))

  return _chunk_loop(rule, listed, (q, r, pairs, listed), body, least(listed.s0, listed.pos0))


def _accumulate(carry, e, rows, keep, s):
  """`(total, dq', count, s_sum)` plus one block's exponentials `e [G, C]` (0 off
  the mined pairs `keep`): dq' += e rows while the rows are in cache."""
  total, g, count, s_sum = carry
  total = total + jnp.sum(e, axis=1)
  g = g + jnp.matmul(e, rows.astype(g.dtype), precision=HI)
  count = count + fused._row_sums(keep)[0].astype(jnp.int32)
  return total, g, count, s_sum + fused._row_sums(jnp.where(keep, s, 0.0))[0]


def _init(q, r):
  g = q.shape[0]
  zero = jnp.zeros((g,), jnp.float32)
  return zero, fused._grad0(q, r), jnp.zeros((g,), jnp.int32), zero


def negative_exponent(ms: MS, ext):
  """`beta (ext - lam)`: the exponent of the most similar mined negative `ext`, the
  shift of `negative_sums`' total (0 where none is mined, ext = -inf)."""
  return jnp.where(ext > -jnp.inf, ms.beta * (ext - ms.lam), 0.0)


def _negative_walk(rule: Rule, ms: MS, q, r, pairs: Pairs, min_pos):
  """`(Sums, dq')`: the mined negatives' exponentials shifted by the largest so far
  (`shift(ext)`), the sums and dq' rescaled as it grows."""
  q, r = fused._f32(q, r)
  shift = lambda m: negative_exponent(ms, m)

  def body(i, carry):
    ext, sums = carry
    s, _, neg, rows = fused._block(rule, i, q, r, pairs)
    keep = neg & (s + ms.mining_margin > min_pos[:, None])  # the plain form's test
    y = jnp.where(keep, s, -jnp.inf)
    new = jnp.maximum(ext, jnp.max(y, axis=1))
    rescale = jnp.where(ext > -jnp.inf, jnp.exp(shift(ext) - shift(new)), 0.0)
    total, g, count, s_sum = sums
    sums = (total * rescale, g * rescale[:, None], count, s_sum)
    e = jnp.exp(ms.beta * (y - ms.lam) - shift(new)[:, None])  # 0 where not mined
    return new, _accumulate(sums, e, rows, keep, s)

  init = (jnp.full(q.shape[:1], -jnp.inf), _init(q, r))
  ext, (total, g, count, s_sum) = fused._loop(rule, (q, r, pairs, min_pos), body, init)
  return Sums(ext, total, count, s_sum), g


def _positive_walk(rule: Rule, ms: MS, q, r, pairs: Pairs, bounds, listed: Listed):
  """`(Sums, dq')` of the mined positives, shifted by `bounds[1]` (ext: unused, 0)."""
  q, r = fused._f32(q, r)
  max_neg, m_pos = bounds[0][:, None], bounds[1][:, None]

  def add(carry, s, pos, rows):
    keep = pos & (s - ms.mining_margin < max_neg)  # the plain form's test
    e = jnp.exp(jnp.where(keep, -ms.alpha * (s - ms.lam) - m_pos, -jnp.inf))
    return _accumulate(carry, e, rows, keep, s)

  body = lambda i, carry: add(carry, *_chunk(rule, i, q, r, pairs, listed))
  first = add(_init(q, r), listed.s0, listed.pos0, listed.rows0.astype(q.dtype))
  total, g, count, s_sum = _chunk_loop(rule, listed, (q, r, pairs, bounds, listed), body, first)
  return Sums(jnp.zeros_like(total), total, count, s_sum), g


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def negative_sums(rule: Rule, ms: MS, q, r, pairs: Pairs, min_pos) -> Sums:
  """`Sums` of each anchor's mined negatives (S + margin > min_pos `[G]`) over
  the memory `r [R, D]`, in one walk, `total` shifted by its extreme's exponent
  `beta (ext - lam)`. Gradient: to `q` through `total` only (any shift gives
  the same log-sum-exp, so the shift's own change cancels)."""
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
def positive_sums(rule: Rule, ms: MS, q, r, pairs: Pairs, bounds, listed: Listed) -> Sums:
  """`Sums` of each anchor's mined positives (S - margin < max_neg) over the listed
  rows, `total` shifted by m_pos; `bounds [2, G]` = (max_neg, m_pos), m_pos at
  least the largest exponent mined (the plain form's stabiliser: the least
  similar positive's, when mined). `ext` is 0 (unused). Gradient: to `q`
  through `total` only."""
  return _positive_walk(rule, ms, q, r, pairs, bounds, listed)[0]


def _positive_fwd(rule, ms, q, r, pairs, bounds, listed):
  sums, g = _positive_walk(rule, ms, q, r, pairs, bounds, listed)
  return sums, (g, jnp.zeros((0,), q.dtype), r, bounds)


def _positive_bwd(rule, ms, res, ct):
  g, q_like, r, bounds = res
  dq = (-ms.alpha * ct.total)[:, None] * g  # d total / dS = -alpha e on mined pairs
  return dq.astype(q_like.dtype), jnp.zeros_like(r), None, jnp.zeros_like(bounds), None


positive_sums.defvjp(_positive_fwd, _positive_bwd)
