"""NumPy loop-over-pairs oracles for the losses: the specification, written naively."""

import math

import numpy as np


def _pairs(q, ql, qv, r, rl, rv, i, thr, self_index=None, ids=None):
  """Yields (j, S_ij, is_pos) for anchor i, in the reference's rules (or, with
  `ids=(query ids, reference ids)`, dropping every positive of the anchor's image)."""
  for j in range(len(r)):
    if not (qv[i] and rv[j]):
      continue
    s = float(np.dot(q[i].astype(np.float64), r[j].astype(np.float64)))
    if ql[i] == rl[j]:
      if ids is not None:
        if ids[0][i] == ids[1][j]:
          continue
      elif self_index is not None:
        if j == self_index[i]:
          continue
      elif s >= thr:
        continue
      yield j, s, True
    else:
      yield j, s, False


def _valid(x, v):
  return np.ones(len(x), bool) if v is None else np.asarray(v, bool)


def contrastive(
  q,
  ql,
  r,
  rl,
  qv=None,
  rv=None,
  margin=0.5,
  thr=1 - 1e-5,
  self_index=None,
  reduction="paper",
  ids=None,
):
  qv, rv = _valid(q, qv), _valid(r, rv)
  total, active = 0.0, 0
  for i in range(len(q)):
    for _, s, is_pos in _pairs(q, ql, qv, r, rl, rv, i, thr, self_index, ids):
      if is_pos:
        total += 1 - s
        active += 1
      elif s > margin:
        total += s
        active += 1
  denom = qv.sum() if reduction == "paper" else active
  return total / max(denom, 1)


def multi_similarity(
  q,
  ql,
  r,
  rl,
  qv=None,
  rv=None,
  alpha=2.0,
  beta=40.0,
  lam=0.5,
  mining=0.1,
  thr=1 - 1e-5,
  reduction="paper",
):
  qv, rv = _valid(q, qv), _valid(r, rv)
  total, n = 0.0, 0
  for i in range(len(q)):
    pairs = list(_pairs(q, ql, qv, r, rl, rv, i, thr))
    pos = [s for _, s, p in pairs if p]
    neg = [s for _, s, p in pairs if not p]
    if not pos or not neg:
      continue
    negk = [s for s in neg if s + mining > min(pos)]
    posk = [s for s in pos if s - mining < max(neg)]
    if not negk or not posk:
      continue
    total += (
      math.log(1 + sum(math.exp(-alpha * (s - lam)) for s in posk)) / alpha
      + math.log(1 + sum(math.exp(beta * (s - lam)) for s in negk)) / beta
    )
    n += 1
  denom = qv.sum() if reduction == "paper" else n
  return total / max(denom, 1)


def triplet(
  q, ql, r, rl, qv=None, rv=None, margin=0.1, mining="all", thr=1 - 1e-5, reduction="paper"
):
  qv, rv = _valid(q, qv), _valid(r, rv)
  total, active = 0.0, 0
  for i in range(len(q)):
    pairs = list(_pairs(q, ql, qv, r, rl, rv, i, thr))
    pos = [s for _, s, p in pairs if p]
    neg = [s for _, s, p in pairs if not p]
    if not pos or not neg:
      continue
    if mining == "hard":
      l = max(0.0, max(neg) - min(pos) + margin)
      total += l
      active += l > 0
      continue
    for sp in pos:
      if mining == "all":
        for sn in neg:
          l = max(0.0, sn - sp + margin)
          total += l
          active += l > 0
      else:  # semihard: the most similar negative below S_ap, else the least similar
        below = [sn for sn in neg if sn < sp]
        sn = max(below) if below else min(neg)
        l = max(0.0, sn - sp + margin)
        total += l
        active += l > 0
  denom = qv.sum() if reduction == "paper" else active
  return total / max(denom, 1)


def margin_rank(q, ql, r, rl, qv=None, rv=None, margin=0.2, thr=1 - 1e-5, reduction="paper"):
  """A loss that is not built in (the test's user loss): per anchor, a hinge of each
  negative against the anchor's mean positive similarity, summed; anchors without
  a positive contribute 0. "mean": over the active (anchor, negative) pairs."""
  qv, rv = _valid(q, qv), _valid(r, rv)
  total, active = 0.0, 0
  for i in range(len(q)):
    pairs = list(_pairs(q, ql, qv, r, rl, rv, i, thr))
    pos = [s for _, s, p in pairs if p]
    if not pos:
      continue
    mean_pos = sum(pos) / len(pos)
    for _, s, p in pairs:
      if not p and s - mean_pos + margin > 0:
        total += s - mean_pos + margin
        active += 1
  denom = qv.sum() if reduction == "paper" else active
  return total / max(denom, 1)


def supcon(q, ql, r, rl, qv=None, rv=None, temperature=0.1, thr=1 - 1e-5, reduction="paper"):
  """Supervised InfoNCE, per anchor with a positive: log sum_a exp(S_a / t) over every
  reference pair of the anchor (positives and negatives), minus the mean of S_p / t."""
  qv, rv = _valid(q, qv), _valid(r, rv)
  total, n = 0.0, 0
  for i in range(len(q)):
    pairs = list(_pairs(q, ql, qv, r, rl, rv, i, thr))
    pos = [s for _, s, p in pairs if p]
    if not pos:
      continue
    z = math.log(sum(math.exp(s / temperature) for _, s, _ in pairs))
    total += z - sum(pos) / len(pos) / temperature
    n += 1
  denom = qv.sum() if reduction == "paper" else n
  return total / max(denom, 1)
