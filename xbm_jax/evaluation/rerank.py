"""Exact ranking on top of fast float32 products: error bounds and a float64 re-ranking.

The blockwise pass (`metrics._block_fn`) ranks by float32 scores from the device's matrix
product, whose summation order is the library's business. Every float32 score `s32` of a
dot product of float32 vectors `q`, `g` of dimension D satisfies, whatever that order
(Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 3.5):

    |s32 - q.g| <= gamma_D sum_k |q_k g_k| <= gamma_D |q| |g|,  gamma_D = D u / (1 - D u),

with u = 2^-24 (round to nearest), plus D 2^-126 if products flush to zero. So when two
float32 scores differ by more than twice that bound, the exact scores are ordered the same
way. The pass flags each query where some score came within that tolerance of the best
positive's (Recall@K could turn on it) or of a neighbour's in its top-R list (MAP@R could);
`float64_rows` ranks those queries again from float64 scores (every product of two float32
numbers is exact in float64; the sum rounds at 2^-53). Every query is then ranked by its
float64 scores, ties by index: the same answer as a float64 brute force, up to float64's own
rounding, whatever float32 product the device computed.
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


def float64_rows(q, q_labels, g, g_labels, rows, self_exclude, chunk_bytes=32 * 2**20):
  """Rank, AP@R, R-precision and precision@1 of queries `rows` from float64 scores.

  Same definitions as `metrics` (ties by gallery index, self removed by index, R = the
  query's number of positives); rows are expected to have at least one positive.
  Args:
    q, g: `[Nq, D]`, `[Ng, D]` float32; q_labels, g_labels: `[Nq]`, `[Ng]` integers.
    rows: `[n]` query indices. chunk_bytes: float64 scores held at once (memory bound).
  Returns:
    rank `[n]` int64, ap `[n]`, r_precision `[n]`, precision_at_1 `[n]` float64.
  """
  ng = g.shape[0]
  per_chunk = max(1, chunk_bytes // (8 * ng))
  out = [np.zeros(len(rows), t) for t in (np.int64, np.float64, np.float64, np.float64)]
  for start in range(0, len(rows), per_chunk):
    sel = np.asarray(rows[start : start + per_chunk])
    s = _float64_scores(q[sel], g, chunk_bytes)
    rel = g_labels[None, :] == q_labels[sel][:, None]
    if self_exclude:
      s[np.arange(len(sel)), sel] = np.nan  # NaN: never compared true, never a positive
      rel[np.arange(len(sel)), sel] = False
    for i, (row_s, row_rel) in enumerate(zip(s, rel)):
      for col, value in zip(out, _one_row(row_s, row_rel)):
        col[start + i] = value
  return out


def _float64_scores(q, g, chunk_bytes):
  """`q @ g.T` in float64 (exact products), converting the gallery a slice at a time."""
  s = np.empty((q.shape[0], g.shape[0]))
  step = max(1, chunk_bytes // (8 * g.shape[1]))
  q64 = q.astype(np.float64)
  for j in range(0, g.shape[0], step):
    s[:, j : j + step] = q64 @ g[j : j + step].astype(np.float64).T
  return s


def _one_row(s, rel):
  """One query: `s` `[Ng]` float64 (self NaN), `rel` `[Ng]` bool (positives)."""
  idx = np.flatnonzero(rel)
  p = np.max(s[idx])
  jpos = idx[np.flatnonzero(s[idx] == p)[0]]  # smallest index among the best
  before = (s > p) | ((s == p) & (np.arange(len(s)) < jpos))
  r = len(idx)
  # The top R by (score desc, index asc): all items >= the R-th largest score, sorted.
  finite = np.flatnonzero(~np.isnan(s))
  kth = np.partition(s[finite], len(finite) - r)[len(finite) - r]
  cand = finite[s[finite] >= kth]
  top = cand[np.lexsort((cand, -s[cand]))][:r]
  hit = rel[top]
  ap = np.sum(np.cumsum(hit) / np.arange(1, r + 1) * hit) / r
  return int(before.sum()), ap, hit.sum() / r, float(hit[0])
