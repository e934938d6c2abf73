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
  multi-similarity: mining needs each anchor's hardest positive and negative
    over the whole row first. Pass 1 (`scan_extremes`) makes S (kept, `[n, G,
    C]`) and those extremes; pass 2 (`ms_rows`, forward) reads S back for the
    mined exponential sums and, under autodiff, overwrites it in place with
    the signed exponentials; the backward (pass 3) reads those: dS is each
    one times its row's weight for its sign, then dq. No pass recomputes S.
  triplet "hard": pass 1 gives the extremes with their tie counts and where
    they are (S is not kept); the value is per-anchor arithmetic on them, and
    `fused_triplet.hardest_grads` is a zero whose backward gathers the two
    hardest rows of each anchor: no second product (a second walk over the
    memory only where an extreme is tied).

The reference is a memory (`MemoryState`, detached by `memory.enqueue`): it
gets no gradient. A sharded memory runs the same blocks on each device's
slice; the per-anchor results combine across devices in `xbm_jax.losses`.
Tested against `jax.grad` of the plain form (tests/test_fused.py,
tests/test_losses.py) and on 8 devices (tests/test_sharded_memory.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

HI = jax.lax.Precision.HIGHEST
CHUNK = 2048  # reference rows per block: [64, 2048] f32 is 512 KiB, in cache


class Rule(NamedTuple):
  """Static settings: the self rule ("similarity" | "key" | "none"), its threshold
  and the block size (reference rows)."""

  self_rule: str
  threshold: float
  chunk: int


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


def _block(rule: Rule, i, q, r, pairs: Pairs, s=None):
  """Block i: `(S [G, C] f32, pos, neg [G, C] bool, reference rows [C, D])`.

  The last block starts at R - C and so overlaps its predecessor: the rows
  already seen are masked out of both pair sets. `s`: the block's S if kept."""
  n_ref = r.shape[0]
  size = _blocks(rule, n_ref)[1]
  start = jnp.minimum(i * size, n_ref - size)
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size)
  rows = take(r)
  if s is None:
    s = jnp.matmul(q, rows.T, precision=HI, preferred_element_type=jnp.float32)
    s = s.astype(jnp.float32)
  fresh = start + jnp.arange(size) >= i * size
  both = pairs.q_valid[:, None] & (take(pairs.r_valid) & fresh)[None, :]
  same = pairs.q_labels[:, None] == take(pairs.r_labels)[None, :]
  pos = same & both
  if rule.self_rule == "similarity":
    pos = pos & (s < rule.threshold)
  elif rule.self_rule == "key":
    pos = pos & (pairs.q_key[:, None] != take(pairs.r_key)[None, :])
  return s, pos, ~same & both, rows


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


def scan_extremes(rule: Rule, q, r, pairs: Pairs, *, ties: bool = True, keep: bool = True):
  """Pass 1: `(S [n, G, C] f32 or None, extremes [6, G])`, extremes = (least
  similar positive, its ties, most similar negative, its ties, the sums of the
  row indices of the tied positives and of the tied negatives): +inf / -inf, 0
  ties where the row has none. A row's index sum is its hardest pair's row in
  `r` where it has one tie (`hardest_grads` gathers it); exact for R <
  `LOCATE_MAX`. `ties=False`: none of the four counted (0). `keep=False`: S
  is not kept (None). No gradient (mining is piecewise constant)."""
  q, r = _f32(*jax.lax.stop_gradient((q, r)))
  n, size = _blocks(rule, r.shape[0])
  big = jnp.float32(jnp.inf)

  def body(i, carry):
    kept, (lo, c_lo, at_lo, hi, c_hi, at_hi) = carry
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
    if keep:
      kept = jax.lax.dynamic_update_index_in_dim(kept, s, i, 0)
    return kept, (lo, c_lo, at_lo, hi, c_hi, at_hi)

  g = q.shape[0]
  inf, zero = jnp.full((g,), big), jnp.zeros((g,), jnp.float32)
  kept = jnp.zeros((n, g, size), jnp.float32) if keep else None
  init = (kept, (inf, zero, zero, inf, zero, zero))
  kept, (lo, c_lo, at_lo, hi, c_hi, at_hi) = _loop(rule, (q, r, pairs), body, init)
  return kept, jnp.stack([lo, c_lo, -hi, c_hi, at_lo, at_hi])


# --------------------------------------------------------------- multi-similarity


class MS(NamedTuple):
  """Static multi-similarity settings (`losses.multi_similarity`)."""

  alpha: float
  beta: float
  lam: float
  mining_margin: float


def _ms_block(rule: Rule, ms: MS, i, q, r, pairs: Pairs, kept, extremes):
  """Block i's mined pairs and their exponentials `e`: exp(-alpha (S - lam) - m_pos)
  on mined positives, exp(beta (S - lam) - m_neg) on mined negatives, 0 elsewhere
  (ONE exp per entry: the two sets are disjoint)."""
  min_pos, max_neg, m_pos, m_neg = (x[:, None] for x in extremes)
  s, pos, neg, rows = _block(rule, i, q, r, pairs, s=kept[i])
  neg_keep = neg & (s + ms.mining_margin > min_pos)
  pos_keep = pos & (s - ms.mining_margin < max_neg)
  x = jnp.where(neg_keep, ms.beta * (s - ms.lam) - m_neg, -jnp.inf)
  e = jnp.exp(jnp.where(pos_keep, -ms.alpha * (s - ms.lam) - m_pos, x))
  return s, pos_keep, neg_keep, e, rows


def _ms_pass(rule: Rule, ms: MS, q, r, pairs: Pairs, kept, extremes, *, keep_e: bool):
  """Pass 2: `(exponential sums [2, G], similarity sums [2, G], counts [2, G]
  int32, kept)` over the mined pairs. Each sum is its own loop carry, so that
  XLA drops the statistics' reductions where nothing reads them. `keep_e`:
  each block of `kept` (S, read once) is overwritten in place by its signed
  exponentials `E` (-e on mined positives, +e on mined negatives, 0 elsewhere),
  all the backward needs: one less pass of masks and exponentials there."""
  q, r = _f32(q, r)

  def body(i, carry):
    e_sums, s_sums, counts, kept = carry
    s, pos_keep, neg_keep, e, _ = _ms_block(rule, ms, i, q, r, pairs, kept, extremes)
    # Written out once (the barrier stops XLA from recomputing the masks and
    # exponentials inside each consumer): both sums read it by its sign.
    signed = jax.lax.optimization_barrier(jnp.where(pos_keep, -e, e))
    e_sums = e_sums + _row_sums(jnp.where(signed < 0, -signed, 0.0), jnp.maximum(signed, 0.0))
    s_sums = s_sums + _row_sums(jnp.where(pos_keep, s, 0.0), jnp.where(neg_keep, s, 0.0))
    if keep_e:
      kept = jax.lax.dynamic_update_index_in_dim(kept, signed, i, 0)
    return e_sums, s_sums, counts + _counts(pos_keep, neg_keep), kept

  g = q.shape[0]
  zeros = jnp.zeros((2, g), jnp.float32)
  init = (zeros, zeros, jnp.zeros((2, g), jnp.int32), kept)
  return _loop(rule, (q, r, pairs, kept, extremes), body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def ms_rows(rule: Rule, ms: MS, q, r, pairs: Pairs, kept, extremes):
  """Per-row sums over the mined pairs (pass 2): `(e_sums, s_sums, counts)`, each
  `[2, G]` (positives, negatives): the shifted exponential sums, the similarity
  sums (float32) and the pair counts (int32). `kept`: pass 1's S; `extremes
  [4, G]`: the whole reference's least similar positive and most similar
  negative and the stabilisers `max(0, -alpha (min_pos - lam))`, `max(0, beta
  (max_neg - lam))` (0 where that set mines nothing). Gradient: to `q` through
  the exponential sums (pass 3 reads pass 2's exponentials); the similarity
  sums and counts are statistics and carry none."""
  return _ms_pass(rule, ms, q, r, pairs, kept, extremes, keep_e=False)[:3]


def _ms_fwd(rule, ms, q, r, pairs, kept, extremes):
  *out, signed_e = _ms_pass(rule, ms, q, r, pairs, kept, extremes, keep_e=True)
  return tuple(out), (jnp.zeros((0,), q.dtype), r, extremes, signed_e)  # [0]: q's dtype


def _ms_bwd(rule, ms, res, ct):
  q_like, r, extremes, signed_e = res
  # d(sum e_pos)/dS = -alpha e = alpha E on mined positives (E < 0), d(sum e_neg)/dS
  # = beta e = beta E on mined negatives; E is 0 (or -0.0, e underflowed) elsewhere.
  w_pos, w_neg = (ms.alpha * ct[0][0])[:, None], (ms.beta * ct[0][1])[:, None]
  size = _blocks(rule, r.shape[0])[1]

  def body(i, g):
    e = signed_e[i]
    ds = e * jnp.where(e < 0, w_pos, w_neg)
    rows = jax.lax.dynamic_slice_in_dim(r, jnp.minimum(i * size, r.shape[0] - size), size)
    return g + jnp.matmul(ds, rows.astype(g.dtype), precision=HI)

  init = jnp.zeros((signed_e.shape[1], r.shape[1]), jnp.promote_types(jnp.float32, r.dtype))
  g = _loop(rule, (q_like, r, signed_e, ct[0]), body, init)
  zeros = jax.tree.map(jnp.zeros_like, (signed_e, extremes))
  return (g.astype(q_like.dtype), jnp.zeros_like(r), None) + zeros


ms_rows.defvjp(_ms_fwd, _ms_bwd)
