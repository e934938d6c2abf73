"""The hard triplet's memory term: its backward without a second product.

Triplet "hard" differentiates two entries of each anchor's row: the least
similar positive and the most similar negative (ties split evenly, as
`jnp.min` does). Its dS has at most those entries, so dq = dS r is the sum of
a few memory rows, each times its anchor's weight, not a product over the
whole memory. Pass 1 (`fused.scan_extremes`) counts each extreme's ties and
sums their row indices: where every anchor's extremes have one entry each (the
rule for real-valued embeddings) the backward gathers those rows (2 per
anchor); where any is tied, it walks the memory once more, recomputing S block
by block (the same product as pass 1's, so the same values to compare), and
splits the gradient over the tied entries. Tested against `jax.grad` of the
plain form (tests/losses/test_fused.py), with and without ties.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from xbm_jax.losses.fused import blocks as fused


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def hardest_grads(rule: fused.Rule, q, r, pairs: fused.Pairs, extremes, located):
  """`[2, G]` zeros whose gradient is that of (least similar positive, most
  similar negative) wrt `q [G, D]`, split evenly over tied entries (backward
  only); add them to pass 1's extremes to differentiate. `extremes [4, G]`:
  (least similar positive, its ties, most similar negative, its ties) over the
  whole reference; `located [4, G]`: the same two extremes over THIS `r` (a
  slice of a split reference, or all of it) and the sums of their tied row
  indices in `r` (`fused.scan_extremes`)."""
  inputs = (q, r, pairs, extremes, located)
  return fused._vary_like(jnp.zeros((2, q.shape[0]), jnp.float32), inputs)


def _hardest_fwd(rule, q, r, pairs, extremes, located):
  return hardest_grads(rule, q, r, pairs, extremes, located), (q, r, pairs, extremes, located)


def _gathered(r, extremes, located, w_lo, w_hi):
  """dq `[G, D]` where each extreme is one entry: its row of `r`, times its
  weight, where this `r` holds it (its extreme is the whole reference's)."""
  lo, c_lo, hi, c_hi = extremes
  my_lo, at_lo, my_hi, at_hi = located

  def rows(at, weight):
    i = jnp.clip(at.astype(jnp.int32), 0, r.shape[0] - 1)
    return weight[:, None] * r[i].astype(jnp.promote_types(jnp.float32, r.dtype))

  here_lo, here_hi = (c_lo == 1) & (my_lo == lo), (c_hi == 1) & (my_hi == hi)
  return rows(at_lo, jnp.where(here_lo, w_lo, 0.0)) + rows(at_hi, jnp.where(here_hi, w_hi, 0.0))


def _walked(rule, q, r, pairs, extremes, w_lo, w_hi):
  """dq `[G, D]` by a walk over the blocks of `r`: S recomputed (pass 1's product),
  each extreme's tied entries weighted."""
  qf, rf = fused._f32(q, r)
  lo, hi = extremes[0][:, None], extremes[2][:, None]

  def body(i, g):
    s, pos, neg, rows = fused._block(rule, i, qf, rf, pairs)
    ds = jnp.where(pos & (s == lo), w_lo[:, None], 0.0)
    ds = ds + jnp.where(neg & (s == hi), w_hi[:, None], 0.0)
    return g + jnp.matmul(ds, rows, precision=fused.HI)

  return fused._loop(rule, (qf, rf, pairs, extremes, w_lo), body, fused._grad0(qf, rf))


def _hardest_bwd(rule, res, ct):
  q, r, pairs, extremes, located = res
  _, c_lo, _, c_hi = extremes
  w_lo, w_hi = ct[0] / jnp.maximum(c_lo, 1.0), ct[1] / jnp.maximum(c_hi, 1.0)
  inputs = (q, r, pairs, extremes, located, ct)
  walk = lambda: fused._vary_like(_walked(rule, q, r, pairs, extremes, w_lo, w_hi), inputs)
  if r.shape[0] >= fused.LOCATE_MAX:  # index sums inexact: always walk
    g = walk()
  else:
    gather = lambda: fused._vary_like(_gathered(r, extremes, located, w_lo, w_hi), inputs)
    g = jax.lax.cond(jnp.all((c_lo <= 1) & (c_hi <= 1)), gather, walk)
  zeros = jax.tree.map(jnp.zeros_like, (extremes, located))
  return (g.astype(q.dtype), jnp.zeros_like(r), None) + zeros


hardest_grads.defvjp(_hardest_fwd, _hardest_bwd)
