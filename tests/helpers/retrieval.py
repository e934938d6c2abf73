"""Retrieval test helpers: a NumPy brute-force oracle of the metrics, clustered data, an
8-device mesh (used by the metrics, re-rank and evaluator tests)."""

import jax
import numpy as np


def oracle(q, ql, g=None, gl=None, ks=(1,), self_exclude=True):
  """Full sort per query: stable by (score desc, index asc); self removed by index."""
  if g is None:
    g, gl = q, ql
  s = q.astype(np.float64) @ g.astype(np.float64).T
  hits = {k: [] for k in ks}
  aps, rps, p1s, excluded = [], [], [], 0
  for i in range(len(q)):
    idx = np.arange(len(g))
    if self_exclude:
      idx = idx[idx != i]
    order = idx[np.lexsort((idx, -s[i, idx]))]
    rel = gl[order] == ql[i]
    r = int(rel.sum())
    if r == 0:
      excluded += 1
      continue
    first = int(np.argmax(rel))
    for k in ks:
      hits[k].append(first < k)
    top = rel[:r]
    aps.append(np.sum(np.cumsum(top) / np.arange(1, r + 1) * top) / r)
    rps.append(top.sum() / r)
    p1s.append(float(rel[0]))
  out = {f"recall@{k}": float(np.mean(hits[k])) for k in ks}
  out.update(
    {
      "map@r": float(np.mean(aps)),
      "r_precision": float(np.mean(rps)),
      "precision@1": float(np.mean(p1s)),
      "num_queries": len(aps),
      "num_singleton_excluded": excluded,
    }
  )
  return out


def assert_same(got, want):
  assert set(got) == set(want), (sorted(got), sorted(want))
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


def clustered(n, d, classes, noise, seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, n) * 7 - 5  # arbitrary integers, negatives too
  centers = rng.standard_normal((classes * 7, d))
  x = centers[labels + 5] + noise * rng.standard_normal((n, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32), labels


def mesh8():
  return jax.make_mesh((8,), ("gallery",))


KS = (1, 2, 4, 8, 500)
