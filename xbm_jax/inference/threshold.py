"""A match threshold calibrated on labelled pairs, and matching with it.

Pairs: every pair `i < j` of a labelled set when there are at most `max_pairs`, else
a seeded sample: up to half of `max_pairs` same-label pairs and as many different-label
pairs, each half weighted by (its pairs in the set) / (pairs drawn), so precision
estimates the whole set's. Scores are float64 dot products of the float32 embeddings.

A pair matches iff its score >= the threshold. For a target precision the lowest
threshold whose precision reaches it (the most recall that precision allows); for a
target recall the highest threshold whose recall reaches it. Candidates are the pair
scores themselves, so the choice is exact on the pairs used (tests scan them all).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Optional

import numpy as np

from xbm_jax.train.errors import UserError


class CalibrationError(UserError, ValueError):
  """The labelled set cannot give the asked threshold (no positives, target unreachable)."""


@dataclasses.dataclass(frozen=True)
class Threshold:
  """`value`: the score threshold; `target` "precision" or "recall" and its `goal`;
  the `precision` / `recall` reached on the calibration pairs, and their counts."""

  value: float
  target: str
  goal: float
  precision: float
  recall: float
  num_positive_pairs: int
  num_negative_pairs: int
  dim: int = 0

  def save(self, path: str) -> None:
    """JSON, written atomically."""
    fd, tmp = tempfile.mkstemp(prefix=".threshold-", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
      json.dump(dataclasses.asdict(self), f, indent=2)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Threshold":
    try:
      with open(path) as f:
        return cls(**json.load(f))
    except (OSError, ValueError, TypeError) as e:
      raise CalibrationError(f"{path} is not a threshold file from xbm-calibrate ({e})") from e


def _all_pairs(emb, labels):
  i, j = np.triu_indices(len(emb), k=1)
  e = emb.astype(np.float64)
  return np.einsum("nd,nd->n", e[i], e[j]), labels[i] == labels[j], np.ones(len(i))


def _sample_pairs(emb, labels, max_pairs, seed):
  """Half same-label pairs, half different-label ones, weighted to the set's counts."""
  rng = np.random.default_rng(seed)
  n = len(labels)
  counts = np.unique(labels, return_counts=True)[1]
  n_pos = int(np.sum(counts * (counts - 1) // 2))
  n_neg = n * (n - 1) // 2 - n_pos
  order = np.argsort(labels, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)])
  half = max_pairs // 2
  # Same-label pairs: a class drawn by its pair count, then two of its members.
  big = np.flatnonzero(counts > 1)
  cls = rng.choice(big, size=half, p=(counts[big] * (counts[big] - 1.0)) / (2 * n_pos))
  a = rng.integers(0, counts[cls])
  b = (a + rng.integers(1, counts[cls])) % counts[cls]
  pi, pj = order[starts[cls] + a], order[starts[cls] + b]
  # Different-label pairs: uniform pairs, the same-label draws rejected.
  i, j = rng.integers(0, n, size=(2, 3 * half))
  keep = labels[i] != labels[j]
  ni, nj = i[keep][:half], j[keep][:half]
  e = emb.astype(np.float64)
  scores = np.concatenate(
    [np.einsum("nd,nd->n", e[pi], e[pj]), np.einsum("nd,nd->n", e[ni], e[nj])]
  )
  same = np.concatenate([np.ones(len(pi), bool), np.zeros(len(ni), bool)])
  w = np.concatenate([np.full(len(pi), n_pos / len(pi)), np.full(len(ni), n_neg / max(len(ni), 1))])
  return scores, same, w


def pair_scores(emb, labels, *, max_pairs: int = 4_000_000, seed: int = 0):
  """`(scores float64 [P], same bool [P], weight float64 [P])` of labelled `[N, D]`."""
  emb, labels = np.asarray(emb), np.asarray(labels)
  n = len(labels)
  if n < 2 or (labels < 0).any():
    raise CalibrationError(
      f"calibration needs >= 2 labelled embeddings; got {n} (labels < 0: unlabelled)"
    )
  if np.unique(labels).size == n:
    raise CalibrationError("calibration needs same-label pairs; every label occurs once")
  if np.unique(labels).size == 1:
    raise CalibrationError("calibration needs different-label pairs; every row has one label")
  if n * (n - 1) // 2 <= max_pairs:
    return _all_pairs(emb, labels)
  return _sample_pairs(emb, labels, max_pairs, seed)


def calibrate(
  scores, same, weight=None, *, precision: Optional[float] = None, recall: Optional[float] = None,
  dim: int = 0,
) -> Threshold:  # fmt: skip
  """The threshold for a target `precision` or `recall` (exactly one) on scored pairs."""
  if (precision is None) == (recall is None):
    raise CalibrationError("give exactly one of a target precision or a target recall")
  goal = float(precision if precision is not None else recall)
  if not 0 < goal <= 1:
    raise CalibrationError(f"the target must be in (0, 1]; got {goal}")
  s, same = np.asarray(scores, np.float64), np.asarray(same, bool)
  w = np.ones(len(s)) if weight is None else np.asarray(weight, np.float64)
  order = np.argsort(-s, kind="stable")
  s, same, w = s[order], same[order], w[order]
  tp = np.cumsum(np.where(same, w, 0.0))
  fp = np.cumsum(np.where(same, 0.0, w))
  last = np.r_[s[1:] != s[:-1], True]  # threshold = s[i] takes every pair scoring >= s[i]
  t, tp, fp = s[last], tp[last], fp[last]
  prec, rec = tp / (tp + fp), tp / tp[-1]
  if precision is not None:
    ok = np.flatnonzero(prec >= goal)
    if not len(ok):
      raise CalibrationError(f"no threshold reaches precision {goal} (best {prec.max():.4f})")
    i = ok[-1]  # lowest threshold: the most recall
  else:
    i = int(np.argmax(rec >= goal))  # highest threshold reaching it
  return Threshold(
    value=float(t[i]), target="precision" if precision is not None else "recall", goal=goal,
    precision=float(prec[i]), recall=float(rec[i]), num_positive_pairs=int(same.sum()),
    num_negative_pairs=int((~same).sum()), dim=int(dim),
  )  # fmt: skip


class Matcher:
  """`is_match(a, b)` and `matches(query)` at a calibrated threshold.

  Args:
    threshold: a `Threshold` (or a float score). index: the gallery for `matches`.
    embedder: optional `Embedder`; then `is_match` / `matches` also take uint8 images
      `[H, W, C]` (or `[N, H, W, C]`).
  """

  def __init__(self, threshold, *, index=None, embedder=None):
    self.threshold = threshold if isinstance(threshold, Threshold) else None
    self.value = float(threshold.value if self.threshold else threshold)
    self.index, self.embedder = index, embedder

  def _rows(self, x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.uint8:  # images
      if self.embedder is None:
        raise ValueError("uint8 images need a Matcher with an embedder")
      return self.embedder.embed_images(x[None] if x.ndim == 3 else x)
    return x[None] if x.ndim == 1 else x

  def is_match(self, a, b):
    """Whether `a` and `b` (embeddings `[D]` / `[N, D]`, or images) are the same item:
    a bool, or bool `[N]` for rows."""
    single = np.ndim(a) in (1, 3) and np.ndim(b) in (1, 3)
    ea, eb = self._rows(a).astype(np.float64), self._rows(b).astype(np.float64)
    out = np.einsum("nd,nd->n", ea, eb) >= self.value
    return bool(out[0]) if single else out

  def matches(self, query, *, k: int = 100) -> list[list[dict]]:
    """For each query row (or image): the index entries (at most k, best first) whose
    score reaches the threshold, as dicts `row, id, label, path, score`."""
    if self.index is None:
      raise ValueError("matches() needs a Matcher with an index")
    scores, rows = self.index.search(self._rows(query), k)
    ids, labels, paths = self.index.ids, self.index.labels, self.index.paths
    return [
      [
        dict(row=int(r), id=int(ids[r]), label=int(labels[r]), path=str(paths[r]), score=float(v))
        for v, r in zip(vs, rs)
        if v >= self.value
      ]
      for vs, rs in zip(scores, rows)
    ]
