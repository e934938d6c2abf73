"""The contrastive loss in one pass over the `[B, R]` similarities (its fast path).

Autodiff of the plain form (`pairs.reduction_loss` over `Rows`) reads the
similarity matrix in several passes: the masks, the masked sums, and in the
backward pass the selects that make d loss / d S. Contrastive's per-anchor loss
is linear in S on piecewise-constant masks, so its derivative is the sign
matrix `dS = -1 on positives, +1 on active negatives, 0 elsewhere`, known in
the same pass as the sums. `jax.custom_vjp` therefore computes, in the forward
pass, S = q r^T (product 1), ONE fused pass over S that makes dS and every
per-anchor sum, and the gradient g = dS r (product 2); the backward pass only
scales g. That is the two products the step cannot avoid plus one pass.

It serves the memory term: the reference is a memory (`MemoryState`, detached
by `memory.enqueue`), which gets no gradient, so nothing of `[B, R]` is saved.
(The in-batch term, whose reference is small and gets a gradient, keeps the
plain form.) Tested against `jax.grad` of the plain form (tests/test_losses.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

HI = jax.lax.Precision.HIGHEST


class Rule(NamedTuple):
  """Static settings: margin, the self rule ("similarity" | "key" | "none") and its
  threshold."""

  margin: float
  self_rule: str
  threshold: float


def _f32(q, r):
  if q.dtype != r.dtype:
    return q.astype(jnp.float32), r.astype(jnp.float32)
  return q, r


def _sign_and_sums(rule: Rule, q, r, ql, rl, qv, rv, qk, rk):
  """(dS [G, R] f32, per-row sums [5, G]: loss, positives, active negatives, their
  similarity sums) from one product and one pass over S."""
  q, r = _f32(q, r)
  s = jnp.matmul(q, r.T, precision=HI, preferred_element_type=jnp.float32).astype(jnp.float32)
  same = ql[:, None] == rl[None, :]
  both = qv[:, None] & rv[None, :]
  pos = same & both
  if rule.self_rule == "similarity":
    pos = pos & (s < rule.threshold)
  elif rule.self_rule == "key":
    pos = pos & (qk[:, None] != rk[None, :])
  neg = ~same & both & (s > rule.margin)
  ds = jnp.where(pos, -1.0, jnp.where(neg, 1.0, 0.0))
  # One variadic reduction: the four row sums in one read of S (XLA fuses the
  # masks into it) instead of a pass per sum.
  zero_i, zero_f = jnp.int32(0), jnp.float32(0)
  n_pos, n_neg, s_pos, s_neg = jax.lax.reduce(
    (
      pos.astype(jnp.int32),
      neg.astype(jnp.int32),
      jnp.where(pos, s, zero_f),
      jnp.where(neg, s, zero_f),
    ),
    (zero_i, zero_i, zero_f, zero_f),
    lambda x, y: tuple(a + b for a, b in zip(x, y)),
    (1,),
  )
  loss = n_pos.astype(jnp.float32) - s_pos + s_neg
  return ds, (loss, n_pos, n_neg, s_pos, s_neg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def contrastive_rows(rule: Rule, q, r, ql, rl, qv, rv, qk, rk):
  """Per-row `(loss, positives, active negatives, pos sim sum, neg sim sum)`, each
  `[G]`, of anchors `q [G, D]` against `r [R, D]` (see the module doc)."""
  return _sign_and_sums(rule, q, r, ql, rl, qv, rv, qk, rk)[1]


def _fwd(rule, q, r, ql, rl, qv, rv, qk, rk):
  ds, sums = _sign_and_sums(rule, q, r, ql, rl, qv, rv, qk, rk)
  g = jnp.matmul(ds, _f32(q, r)[1], precision=HI)  # [G, D]: d loss_i / d q_i
  return sums, (g, jnp.zeros((0,), q.dtype), r)  # an empty array carries q's dtype


def _bwd(rule, res, ct):
  g, q_like, r = res
  dq = (ct[0][:, None] * g).astype(q_like.dtype)
  return (dq, jnp.zeros_like(r), None, None, None, None, None, None)  # the memory: none


contrastive_rows.defvjp(_fwd, _bwd)
