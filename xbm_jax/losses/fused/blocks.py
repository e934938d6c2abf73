"""The memory term at its product floor: contrastive, multi-similarity, hard triplet.

A step against the memory needs two products, S = q r^T (`[G, R]`) forward and
dq = dS r backward. Autodiff of the plain form (`pairs.reduction_loss` over
`Rows`) adds passes over the `[G, R]` similarities between them: the masks,
each per-anchor reduction (XLA:CPU reduces integer rows through slow window
trees and float rows only from a written-out array) and, backward, the
selects that make dS. Here the reference is walked in blocks of `CHUNK` rows:
a `[G, CHUNK]` block of S, its masks, row reductions and dS stay in cache,
and each block's share of dq = dS r is added while its rows are still there.

Statistics (pair counts, similarity sums) are loop carries of their own: XLA
drops their reductions where nothing reads them (`return_stats=False`).

Per loss (everything else is per-anchor `[G]` arithmetic in `xbm_jax.losses`):

  contrastive: dS is the sign matrix (-1 on positives, +1 on active
    negatives), known block by block: ONE pass makes the row sums and dq, and
    the backward only scales dq (`contrastive_rows`).
  multi-similarity: mining needs each anchor's least similar positive before
    its negatives can be mined, and its most similar negative before its
    positives can: `xbm_jax.losses.fused.ms` lists the positives from the labels
    first, then walks the memory ONCE for the negatives (their exponential
    sums accumulated online, as flash attention does) and the listed positives
    again; each backward only scales its dq.
  triplet "hard": pass 1 gives the extremes with their tie counts and where
    they are (S is not kept); the value is per-anchor arithmetic on them, and
    `fused_triplet.hardest_grads` is a zero whose backward gathers the two
    hardest rows of each anchor: no second product (a second walk over the
    memory only where an extreme is tied).

The reference is a memory (`MemoryState`, detached by `memory.enqueue`): it
gets no gradient. A sharded memory runs the same blocks on each device's
slice; the per-anchor results combine across devices in `xbm_jax.losses`.
Tested against `jax.grad` of the plain form (tests/losses/test_fused.py,
tests/losses/test_builtin.py) and on 8 devices (tests/memory/test_sharded.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

HI = jax.lax.Precision.HIGHEST
CHUNK = 4096  # reference rows per block: [64, 4096] f32 is 1 MiB, in cache
LIST_CHUNK = 512  # listed rows in the first gathered chunk (multi-similarity's positives)


class Rule(NamedTuple):
  """Static settings: the self rule ("similarity" | "key" | "none"), its threshold,
  the block size (reference rows) and the chunk size of listed rows."""

  self_rule: str
  threshold: float
  chunk: int
  list_chunk: int = LIST_CHUNK


class Pairs(NamedTuple):
  """Both sides' labels, validity and self keys (`[G]` anchors, `[R]` reference)."""

  q_labels: jax.Array
  r_labels: jax.Array
  q_valid: jax.Array
  r_valid: jax.Array
  q_key: jax.Array
  r_key: jax.Array


def _f32(q, r):
  if q.dtype != r.dtype:
    return q.astype(jnp.float32), r.astype(jnp.float32)
  return q, r


def _blocks(rule: Rule, n_ref: int) -> tuple[int, int]:
  """(number of blocks n, rows per block C): n * C >= R, C <= R."""
  n = max(1, -(-n_ref // rule.chunk))
  return n, -(-n_ref // n) if n_ref else 0


def _block(rule: Rule, i, q, r, pairs: Pairs):
  """Block i: `(S [G, C] f32, pos, neg [G, C] bool, reference rows [C, D])`.

  The last block starts at R - C and so overlaps its predecessor: the rows
  already seen are masked out of both pair sets."""
  n_ref = r.shape[0]
  size = _blocks(rule, n_ref)[1]
  start = jnp.minimum(i * size, n_ref - size)
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size)
  rows = take(r)
  s = jnp.matmul(q, rows.T, precision=HI, preferred_element_type=jnp.float32).astype(jnp.float32)
  pos, neg = pair_masks(rule, s, pairs, take, start + jnp.arange(size) >= i * size)
  return s, pos, neg, rows


def pair_masks(rule: Rule, s, pairs: Pairs, take, live):
  """`(pos, neg)` `[G, C]` of the anchors against C reference entries: `take(x)`
  picks their entries of a `[R]` array, `live [C]` drops some of them (rows
  seen already, padding). Positives obey the self rule; both need validity."""
  both = pairs.q_valid[:, None] & (take(pairs.r_valid) & live)[None, :]
  same = pairs.q_labels[:, None] == take(pairs.r_labels)[None, :]
  pos = same & both
  if rule.self_rule == "similarity":
    pos = pos & (s < rule.threshold)
  elif rule.self_rule == "key":
    pos = pos & (pairs.q_key[:, None] != take(pairs.r_key)[None, :])
  return pos, ~same & both


def _row_sums(*xs):
  """`[k, G]` float32 row sums of k `[G, C]` arrays (masks count as 0/1). Float
  because XLA:CPU sums integer rows through slow window trees; a block's count
  (<= C) is exact in float32, and callers add blocks' counts as int32."""
  return jnp.stack([jnp.sum(x.astype(jnp.float32), axis=1) for x in xs])


PACK = 4096  # two counts of a block share one float32 sum: a + PACK * b < 2**24


def _counts(a, b):
  """`[2, G]` int32 row counts of two `[G, C]` bool blocks, in ONE float32 row sum
  of `a + PACK * b` (exact for C < PACK: the sum stays below 2**24)."""
  if a.shape[1] >= PACK:  # blocks that large: two sums
    return _row_sums(a, b).astype(jnp.int32)
  packed = _row_sums(jnp.where(b, float(PACK), 0.0) + a)[0].astype(jnp.int32)
  return jnp.stack([packed % PACK, packed // PACK])


def _grad0(q, r):
  """Zeros for dq' = dS r `[G, D]` (float32, or wider with a wider reference)."""
  return jnp.zeros(q.shape, jnp.promote_types(jnp.float32, r.dtype))


def _varying(x) -> set:
  """The mesh axes x varies over inside shard_map (none outside)."""
  return set(getattr(getattr(jax.typeof(x), "mat", None), "varying", ()) or ())


def _vary_like(tree, inputs):
  """`tree` typed as varying over every mesh axis `inputs` vary over (inside
  shard_map; a no-op outside), as values computed from them are."""
  axes = set().union(*(_varying(x) for x in jax.tree.leaves(inputs)))

  def vary(x):
    missing = tuple(sorted(axes - _varying(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(vary, tree)


def _loop(rule: Rule, inputs, body, init):
  """fori_loop over the blocks of `inputs = (q, r, ...)`, the carry typed as the
  body's (`_vary_like`)."""
  n_ref = inputs[1].shape[0]
  return jax.lax.fori_loop(0, _blocks(rule, n_ref)[0], body, _vary_like(init, inputs))


# ------------------------------------------------------------------- contrastive


def _contrastive_pass(rule: Rule, margin: float, q, r, pairs: Pairs):
  """(per-row loss `[G]`, `[2, G]` pair counts, `[2, G]` similarity sums, dq' = dS r
  `[G, D]`) of positives and active negatives, in one pass. Each is its own loop
  carry: XLA drops the statistics' reductions where nothing reads them, and the
  loss is one row sum of its terms (1 - S on positives, S on active negatives)."""
  q, r = _f32(q, r)

  def body(i, carry):
    loss, counts, sums, g = carry
    s, pos, neg, rows = _block(rule, i, q, r, pairs)
    neg = neg & (s > margin)
    ds = jnp.where(pos, -1.0, jnp.where(neg, 1.0, 0.0))
    loss = loss + _row_sums(jnp.where(pos, 1.0 - s, jnp.where(neg, s, 0.0)))[0]
    sums = sums + _row_sums(jnp.where(pos, s, 0.0), jnp.where(neg, s, 0.0))
    return loss, counts + _counts(pos, neg), sums, g + jnp.matmul(ds, rows, precision=HI)

  g = q.shape[0]
  zeros = jnp.zeros((2, g), jnp.float32)
  init = (zeros[0], jnp.zeros((2, g), jnp.int32), zeros, _grad0(q, r))
  return _loop(rule, (q, r, pairs), body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def contrastive_rows(rule: Rule, margin: float, q, r, pairs: Pairs):
  """Per-row `(loss, positives, active negatives, pos sim sum, neg sim sum)`, each
  `[G]` (counts int32), of anchors `q [G, D]` against the memory rows `r [R, D]`."""
  return _contrastive_out(*_contrastive_pass(rule, margin, q, r, pairs)[:3])


def _contrastive_out(loss, counts, sums):
  return (loss, *counts, *sums)


def _contrastive_fwd(rule, margin, q, r, pairs):
  *out, g = _contrastive_pass(rule, margin, q, r, pairs)
  return _contrastive_out(*out), (g, jnp.zeros((0,), q.dtype), r)  # [0]: q's dtype


def _contrastive_bwd(rule, margin, res, ct):
  g, q_like, r = res
  dq = (ct[0][:, None] * g).astype(q_like.dtype)  # only the loss gets a gradient
  return dq, jnp.zeros_like(r), None


contrastive_rows.defvjp(_contrastive_fwd, _contrastive_bwd)


# ------------------------------------------------ pass 1: S and the row extremes


def _merge_min(a, ca, ia, b, cb, ib):
  """(min, ties, index sum) of two (value, tie count, sum of the tied entries'
  row indices) triples."""
  m = jnp.minimum(a, b)
  pick = lambda x, y: jnp.where(a == m, x, 0.0) + jnp.where(b == m, y, 0.0)
  return m, pick(ca, cb), pick(ia, ib)


LOCATE_MAX = 2**24  # row indices summed in float32 are exact below this


def scan_extremes(rule: Rule, q, r, pairs: Pairs, *, ties: bool = True):
  """`extremes [6, G]` = (least similar positive, its ties, most similar
  negative, its ties, the sums of the row indices of the tied positives and of
  the tied negatives): +inf / -inf, 0 ties where the row has none. A row's
  index sum is its hardest pair's row in `r` where it has one tie
  (`fused_triplet.hardest_grads` gathers it); exact for R < `LOCATE_MAX`.
  `ties=False`: none of the four counted (0). No gradient (mining is piecewise
  constant)."""
  q, r = _f32(*jax.lax.stop_gradient((q, r)))
  size = _blocks(rule, r.shape[0])[1]
  big = jnp.float32(jnp.inf)

  def body(i, carry):
    lo, c_lo, at_lo, hi, c_hi, at_hi = carry
    s, pos, neg, _ = _block(rule, i, q, r, pairs)
    sp, sn = jnp.where(pos, s, big), jnp.where(neg, -s, big)  # both as minima
    blo, bhi = jnp.min(sp, axis=1), jnp.min(sn, axis=1)
    tied = jnp.zeros((4,) + blo.shape, jnp.float32)
    if ties:
      tie_lo, tie_hi = (sp == blo[:, None]) & pos, (sn == bhi[:, None]) & neg
      row = (jnp.minimum(i * size, r.shape[0] - size) + jnp.arange(size)).astype(jnp.float32)
      at = _row_sums(jnp.where(tie_lo, row, 0.0), jnp.where(tie_hi, row, 0.0))
      tied = jnp.concatenate([_counts(tie_lo, tie_hi).astype(jnp.float32), at])
    lo, c_lo, at_lo = _merge_min(lo, c_lo, at_lo, blo, tied[0], tied[2])
    hi, c_hi, at_hi = _merge_min(hi, c_hi, at_hi, bhi, tied[1], tied[3])
    return lo, c_lo, at_lo, hi, c_hi, at_hi

  g = q.shape[0]
  inf, zero = jnp.full((g,), big), jnp.zeros((g,), jnp.float32)
  lo, c_lo, at_lo, hi, c_hi, at_hi = _loop(rule, (q, r, pairs), body, (inf, zero, zero) * 2)
  return jnp.stack([lo, c_lo, -hi, c_hi, at_lo, at_hi])


class MS(NamedTuple):
  """Static multi-similarity settings (`losses.multi_similarity`)."""

  alpha: float
  beta: float
  lam: float
  mining_margin: float
