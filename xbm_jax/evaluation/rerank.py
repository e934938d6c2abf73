"""Exact ranking on top of fast float32 products: when a float32 score settles an order.

The blockwise pass (`blockwise.block_fn`) ranks by float32 scores from the device's matrix
product, whose summation order is the library's business. Every float32 score `s32` of a
dot product of float32 vectors `q`, `g` of dimension D satisfies, whatever that order
(Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5):

    |s32 - q.g| <= gamma_D sum_k |q_k g_k| <= gamma_D |q| |g|,  gamma_D = D u / (1 - D u),

with u = 2^-24 (round to nearest), plus D 2^-126 if products flush to zero. So when two
float32 scores differ by more than twice that bound, the exact scores are ordered the same
way. The pass flags each query where some score came within that tolerance of the best
positive's (Recall@K could turn on it) or of a neighbour's in its top-R list (MAP@R could);
`metrics` runs those queries through the same pass again with float64 scores (every
product of two float32 numbers is exact in float64; the sum rounds at 2^-53). Every query
is then ranked by its float64 scores, ties by index: the same answer as a float64 brute
force, up to float64's own rounding, whatever float32 product the device computed.
"""

from __future__ import annotations

import numpy as np

_F32_MAX_SAFE = 1e37  # well below float32's 3.4e38


def scores_finite(q, g) -> bool:
  """True when no score or partial sum can overflow float32: every |q_k g_k| and every
  partial sum of a row's products is at most D max|q| max|g| (times 1 + D 2^-24 for
  rounding), kept well below float32's maximum. Then the NaN guard can be skipped."""
  amax = lambda x: max(float(x.max()), -float(x.min())) if x.size else 0.0
  return q.shape[1] * amax(q) * amax(g) < _F32_MAX_SAFE


def score_tolerance(q, g) -> np.ndarray:
  """`[Nq]` float32: twice the bound on |float32 score - exact score| of query i against
  any gallery item (`gamma_D |q_i| max_j |g_j|` plus the flush-to-zero term), rounded up
  by a margin so that the float32 comparisons made with it stay safe."""
  d = q.shape[1]
  gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
  q_norm = np.sqrt(np.einsum("ij,ij->i", q, q, dtype=np.float64))
  g_norm = np.sqrt(np.max(np.einsum("ij,ij->i", g, g, dtype=np.float64)))
  bound = gamma * q_norm * g_norm + d * 2.0**-126
  return (2 * bound * (1 + 1e-3) + 2.0**-120).astype(np.float32)
