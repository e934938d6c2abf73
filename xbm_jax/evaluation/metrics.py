"""Exact retrieval metrics (Recall@K, MAP@R, R-precision, precision@1), blockwise on device.

Definitions (cosine similarity of the given embeddings; higher is closer):

* **Scores** are the dot products of the given float32 embeddings, ranked as a float64
  brute force ranks them: the device computes float32 products (fast), and each query
  whose order a float32 score cannot settle (a score within the proven float32 error
  bound of its best positive's, or of a neighbour's in its top-R list) is ranked again
  from float64 scores on the host (`rerank`: typically 1-3% of queries). Embeddings so
  large that a float32 score could overflow (D max|q| max|g| >= 1e37) are ranked by
  their float32 scores instead, a non-finite score (inf, or NaN from inf - inf: which one
  depends on the CPU's fused multiply-adds) ranking first and never a hit.
* **Ranking and ties.** Each query ranks the gallery by descending score; equal scores are
  ordered by ascending gallery index (a stable sort of `-score`). This rule is the only
  tie rule used, by every metric, so results are deterministic and reproducible with
  `np.argsort(-s, kind="stable")`.
* **Self exclusion** (leave-one-out): the query's own gallery item is removed *by index*
  before ranking (not by dropping rank 0, which is wrong when a duplicate outranks self).
* **Positives** of a query are gallery items with the same label (self excluded).
  Queries without any positive (singleton classes in leave-one-out; labels missing from
  the gallery in query/gallery) are excluded from every metric and counted in
  `num_singleton_excluded`.
* **Recall@K**: fraction of queries whose first positive is among the first K items.
  A query hits at K iff fewer than K negatives rank before its best positive, i.e.
  `#{neg: s > p} + #{neg: s == p, index < jpos} < K`, where `p` is the best positive
  score and `jpos` the smallest index of a positive scoring `p`. That is one counting
  pass, no sort: `K` may be 1000 at the cost of K = 1.
* **MAP@R** and **R-precision** (Musgrave et al. 2020, "A Metric Learning Reality
  Check", sec. 3.2): with R the number of positives of the query,
  `MAP@R = 1/R sum_{i<=R} P(i)` where `P(i)` is precision at i if the i-th item is a
  positive and 0 otherwise; `R-precision = (#positives in the top R) / R`. They need the
  top R items only: a top-k with k = max R + 1 (+1 for self), taken over the maxima of runs
  of 32 columns first (exactly `lax.top_k`'s result, see `blockwise.top_k_by_runs`).
* **precision@1**: fraction of queries whose first item is a positive (read from the
  top-R list; equal to Recall@1 by definition, kept as a cross-check).

Scale: queries go through in blocks of at most `block_size` rows against the whole
gallery, fewer where needed to keep a block's `[rows, N_gallery / num_devices]` float32
score matrix within `block_bytes` (64 MiB: 272 rows for SOP), with two blocks in flight;
the N x N matrix is never built (SOP leave-one-out peaks at about +80-230 MiB).
The best positive score is gathered from the block's own score matrix, so every comparison
is between bit-identical numbers. Host memory: the positive lists are `[Nq, max class
size]` int32 (fine for DML benchmarks; a class of 10^4 items would cost Nq x 40 KB). With
a `mesh`, the gallery is sharded over all its devices (`jax.shard_map`) and the
per-device partial results are combined with `pmax` / `pmin` / `psum` / `all_gather`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from xbm_jax.evaluation import blockwise, rerank


def _check_set(emb, labels, name):
  emb = np.asarray(emb)
  labels = np.asarray(labels)
  if emb.ndim != 2:
    raise ValueError(f"{name}_emb must be [N, D]; got shape {emb.shape}")
  if not np.issubdtype(emb.dtype, np.floating):
    raise TypeError(f"{name}_emb must be floating point; got dtype {emb.dtype}")
  bad = ~np.isfinite(emb).all(axis=1)
  if bad.any():
    # NaN rows would rank as perfect retrieval; a broken model must not score.
    raise ValueError(
      f"{name}_emb has {int(bad.sum())} of {len(bad)} rows with NaN/inf "
      f"(first row {int(np.flatnonzero(bad)[0])}); refusing to score them"
    )
  if labels.shape != emb.shape[:1]:
    raise ValueError(
      f"{name}_labels must be [N]={emb.shape[:1]} to match {name}_emb "
      f"{emb.shape}; got shape {labels.shape}"
    )
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"{name}_labels must be integers; got dtype {labels.dtype}")
  return emb.astype(np.float32, copy=False), labels.astype(np.int64, copy=False)


def _positive_lists(query_labels, gallery_labels, self_exclude):
  """Host-side: `[Nq, P]` int32 gallery indices of each query's positives (-1 padded).

  Built with one stable argsort of the gallery labels, so O(N log N) and no N x N mask.
  """
  order = np.argsort(gallery_labels, kind="stable")
  sorted_labels = gallery_labels[order]
  start = np.searchsorted(sorted_labels, query_labels, side="left")
  stop = np.searchsorted(sorted_labels, query_labels, side="right")
  count = stop - start
  width = max(int(count.max()) if count.size else 0, 1)
  cols = np.arange(width)
  take = start[:, None] + cols[None, :]
  valid = cols[None, :] < count[:, None]
  pos = np.where(valid, order[np.minimum(take, len(order) - 1)], -1)
  if self_exclude:
    is_self = pos == np.arange(len(query_labels))[:, None]
    pos = np.where(is_self, -1, pos)
    count = count - is_self.sum(axis=1)
    # Push the removed self slot (-1) to the end of the row; order within a row is free.
    pos = -np.sort(-pos, axis=1)
    if width > 1:
      pos = pos[:, : max(int(count.max()) if count.size else 0, 1)]
  return pos.astype(np.int32), count.astype(np.int32)


def _checked_inputs(
  query_emb, query_labels, gallery_emb, gallery_labels, ks, self_exclude, block_size, block_bytes
):
  """`retrieval_metrics`' arguments checked (one error naming the argument):
  `(q, ql, g, gl, ks)`, the gallery defaulting to the queries."""
  q, ql = _check_set(query_emb, query_labels, "query")
  if gallery_emb is None:
    g, gl = q, ql
  else:
    g, gl = _check_set(gallery_emb, gallery_labels, "gallery")
  if q.shape[1] != g.shape[1]:
    raise ValueError(f"query_emb dim {q.shape[1]} != gallery_emb dim {g.shape[1]}")
  if self_exclude and q.shape[0] != g.shape[0]:
    raise ValueError(
      f"self_exclude=True needs the gallery to be the query set; got "
      f"{q.shape[0]} queries and {g.shape[0]} gallery items"
    )
  ks = tuple(int(k) for k in ks)
  if any(k < 1 for k in ks):
    raise ValueError(f"ks must be >= 1; got {ks}")
  if block_size < 1 or block_bytes < 1:
    raise ValueError(f"block_size and block_bytes must be >= 1; got {block_size}, {block_bytes}")
  nq, ng = q.shape[0], g.shape[0]
  if ng == 0 or nq == 0:
    raise ValueError(f"empty query ({nq}) or gallery ({ng}) set")
  return q, ql, g, gl, ks


def retrieval_metrics(
  query_emb,
  query_labels,
  gallery_emb=None,
  gallery_labels=None,
  *,
  ks: Sequence[int] = (1,),
  self_exclude: bool,
  map_at_r: bool = True,
  block_size: int = 1024,
  block_bytes: int = 64 * 2**20,
  mesh: Optional[Mesh] = None,
  per_query: bool = False,
) -> dict:
  """All retrieval metrics in one blockwise pass over the gallery.

  Args:
    query_emb: `[Nq, D]` float (host or device array); rows should be L2-normalised
      (scores are plain dot products).
    query_labels: `[Nq]` integer labels.
    gallery_emb, gallery_labels: `[Ng, D]`, `[Ng]`; default to the queries (leave-one-out).
    ks: the K of Recall@K, each >= 1.
    self_exclude: True for leave-one-out: query i is gallery item i and is removed from
      its own ranking (requires Nq == Ng).
    map_at_r: also compute MAP@R, R-precision and precision@1 (adds a top-R pass).
    block_size: at most this many queries per block.
    block_bytes: and at most as many as keep a block's `[rows, Ng/devices]` float32 score
      matrix within this many bytes (64 MiB: host memory stays bounded for any gallery;
      raise it on an accelerator with memory to spare, for fewer, larger products).
    mesh: optional mesh; the gallery is sharded over all of its axes.
    per_query: also return per-query arrays (`rank`, `valid`, and with map_at_r `ap`)
      and `num_reranked_float64` (queries whose order a float32 score could not settle).
  Returns:
    dict with `recall@K` for each K, `map@r`, `r_precision`, `precision@1` (floats in
    [0, 1]), `num_queries` (queries scored) and `num_singleton_excluded` (queries with no
    positive in the gallery).
  """
  q, ql, g, gl, ks = _checked_inputs(
    query_emb, query_labels, gallery_emb, gallery_labels, ks, self_exclude, block_size, block_bytes
  )
  nq, ng = q.shape[0], g.shape[0]

  pos, npos = _positive_lists(ql, gl, self_exclude)
  has_pos = npos > 0
  kw = dict(block_size=block_size, block_bytes=block_bytes, mesh=mesh)
  # The top list: R items (+ self), + 1 to see the gap after the last one.
  top_k = int(npos.max()) + (2 if self_exclude else 1) if map_at_r and has_pos.any() else 0
  top_k = min(top_k, ng)
  finite = rerank.scores_finite(q, g)
  tol = rerank.score_tolerance(q, g) if finite else np.full(nq, -1.0, np.float32)
  q_self = np.arange(nq, dtype=np.int32) if self_exclude else np.full(nq, -1, np.int32)
  cols = blockwise.device_pass(q, tol, q_self, pos, npos, ql, g, gl, top_k, not finite, **kw)
  # Queries where float32 rounding could decide an order: ranked again by the same pass
  # in float64 (on the device: GPUs and TPUs do float64 too), tolerance off.
  redo = np.flatnonzero(cols[1] & has_pos)
  if len(redo):
    kw["block_bytes"] = max(1, block_bytes // 2)  # 8-byte scores
    with jax.enable_x64(True):
      again = blockwise.device_pass(
        q[redo], np.full(len(redo), -1.0), q_self[redo], pos[redo], npos[redo], ql[redo],
        g, gl, top_k, False, dtype=np.float64, **kw
      )  # fmt: skip
    for col, new in zip(cols, again):
      col[redo] = new

  rank = cols[0].astype(np.int64)
  n = int(has_pos.sum())
  res = {}
  for k in ks:
    res[f"recall@{k}"] = float(np.sum((rank < k) & has_pos) / n) if n else float("nan")
  if top_k:
    for name, col in zip(("map@r", "r_precision", "precision@1"), cols[2:]):
      res[name] = float(np.sum(np.where(has_pos, col.astype(np.float64), 0.0)) / n)
  elif map_at_r:
    res.update({"map@r": float("nan"), "r_precision": float("nan"), "precision@1": float("nan")})
  res["num_queries"] = n
  res["num_singleton_excluded"] = int(nq - n)
  if per_query:
    res["num_reranked_float64"] = int(len(redo))
    res["rank"] = np.where(has_pos, rank, -1)
    res["valid"] = has_pos
    if top_k:
      res["ap"] = cols[2]
  return res


def recall_at_k(
  query_emb,
  query_labels,
  gallery_emb=None,
  gallery_labels=None,
  ks=(1,),
  *,
  self_exclude: bool,
  block_size: int = 1024,
  mesh=None,
) -> dict:
  """Recall@K only (no top-R pass): `{"recall@K": float, ..., "num_queries": int,
  "num_singleton_excluded": int}`. Arguments as in `retrieval_metrics`."""
  return retrieval_metrics(
    query_emb,
    query_labels,
    gallery_emb,
    gallery_labels,
    ks=ks,
    self_exclude=self_exclude,
    map_at_r=False,
    block_size=block_size,
    mesh=mesh,
  )


def map_at_r(
  query_emb,
  query_labels,
  gallery_emb=None,
  gallery_labels=None,
  *,
  self_exclude: bool,
  block_size: int = 1024,
  mesh=None,
) -> dict:
  """MAP@R, R-precision and precision@1 (Musgrave et al. 2020). Arguments as in
  `retrieval_metrics`; returns `{"map@r", "r_precision", "precision@1", "num_queries",
  "num_singleton_excluded"}`."""
  res = retrieval_metrics(
    query_emb,
    query_labels,
    gallery_emb,
    gallery_labels,
    ks=(),
    self_exclude=self_exclude,
    map_at_r=True,
    block_size=block_size,
    mesh=mesh,
  )
  return res
