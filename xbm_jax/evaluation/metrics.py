"""Exact retrieval metrics (Recall@K, MAP@R, R-precision, precision@1), blockwise on device.

Definitions (cosine similarity of the given embeddings; higher is closer):

* **Scores** are the dot products of the given float32 embeddings, ranked as a float64
  brute force ranks them: the device computes float32 products (fast), and each query
  whose order a float32 score cannot settle (a score within the proven float32 error
  bound of its best positive's, or of a neighbour's in its top-R list) is ranked again
  from float64 scores on the host (`rerank`: typically 1-3% of queries). Embeddings so
  large that a float32 score could overflow (D max|q| max|g| >= 1e37) are ranked by
  their float32 scores instead, a NaN score (inf - inf) ranking first and never a hit.
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
  of 32 columns first (exactly `lax.top_k`'s result, see `_top_k_by_runs`).
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

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xbm_jax.evaluation import rerank

_BIG_INDEX = np.iinfo(np.int32).max
_RUN = 32  # gallery shards are padded to a multiple of this many rows


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


def _block_fn(
  q,
  q_tol,
  q_self,
  q_pos,
  q_labels,
  q_npos,
  g,
  g_labels,
  *,
  n_gallery,
  top_k,
  axis,
  num_shards,
  may_overflow,
):
  """Per-device body: one query block against this device's gallery shard.

  Args:
    q: `[B, D]` float32 queries (replicated). q_tol: `[B]` float32, twice the bound on a
      float32 score's error (`rerank.score_tolerance`), or -1 to rank by the float32 scores.
      q_self: `[B]` int32 global gallery index of
      the query itself, or -1. q_pos: `[B, P]` int32 global gallery indices of positives,
      -1 padded. q_labels: `[B]` int32. q_npos: `[B]` int32 number of positives (R).
    g: `[G, D]` float32 gallery shard; g_labels: `[G]` int32.
    n_gallery: true gallery size (rows at global index >= n_gallery are padding).
    top_k: 0 to skip MAP@R, else how many items to keep (max R, +1 with self).
    may_overflow: False when the host proved every score finite (`rerank.scores_finite`).
  Returns:
    rank `[B]` int32 (negatives ranked before the best positive); `[B]` bool, True where a
    score came within q_tol of the best positive's or of a neighbour's in the top list
    (float32 rounding could decide the order there: `rerank.float64_rows` ranks those again);
    and when top_k: average precision at R `[B]`, R-precision `[B]`, precision@1 `[B]`.
  """
  size = g.shape[0]
  offset = jax.lax.axis_index(axis) * size
  s = jax.lax.dot_general(
    q, g, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST
  )  # [B, G]
  if may_overflow:
    # A NaN score (finite inputs can overflow to inf - inf) ranks first and is never a
    # hit: as +inf it is counted before any positive, and a NaN positive is never the
    # best one. Compared against NaN, it would rank nowhere and a NaN best positive
    # would have nothing before it: rank 0, a "hit".
    nan = jnp.isnan(s)
    s = jnp.where(nan, jnp.inf, s)
  else:  # the host proved every score finite: no [B, G] copy, one pass less
    nan = None

  # Best positive: gathered from this very matrix, so p is bit-identical to s[i, jpos].
  local = q_pos - offset
  mine = (q_pos >= 0) & (local >= 0) & (local < size)
  vals = jnp.take_along_axis(s, jnp.clip(local, 0, size - 1), axis=1)
  usable = mine
  if nan is not None:  # a NaN positive is never the best one
    usable = mine & ~jnp.take_along_axis(nan, jnp.clip(local, 0, size - 1), axis=1)
  vals = jnp.where(usable, vals, -jnp.inf)
  p = jax.lax.pmax(jnp.max(vals, axis=1), axis)  # [B]; -inf where no positive
  jpos = jnp.where(mine & (vals == p[:, None]), q_pos, _BIG_INDEX)
  jpos = jax.lax.pmin(jnp.min(jpos, axis=1), axis)  # [B]

  # One counting pass: items ranked before the best positive. Positives never count
  # (none scores above p, none ties p at a smaller index than jpos), so no label mask.
  col = offset + jnp.arange(size, dtype=jnp.int32)
  pc, jc = p[:, None], jpos[:, None]
  before = ((s > pc) | ((s == pc) & (col[None, :] < jc))) & (col[None, :] < n_gallery)
  # Sum int8 over runs of _RUN columns first (a run's count fits int8): on XLA:CPU this
  # fuses compare and sum into one pass at ~5% of the matmul, where a direct int32/float
  # row sum materialises the mask and costs 50-60% of it.
  # Scores within the tolerance of p (p's own item among them): the same read of s.
  near = (jnp.abs(s - pc) <= q_tol[:, None]) & (col[None, :] < n_gallery)
  shape = (s.shape[0], size // _RUN, _RUN)
  operands = [before.astype(jnp.int8).reshape(shape), near.astype(jnp.int8).reshape(shape)]
  inits = [jnp.int8(0), jnp.int8(0)]
  if top_k:  # the run maxima for the top-R pass come out of the same read of s
    operands.append(s.reshape(shape))
    inits.append(jnp.array(-jnp.inf, s.dtype))
  outs = jax.lax.reduce(
    tuple(operands),
    tuple(inits),
    lambda a, b: (a[0] + b[0], a[1] + b[1]) + ((jnp.maximum(a[2], b[2]),) if top_k else ()),
    (2,),
  )
  count, n_near = (jnp.sum(o.astype(jnp.int32), axis=1) for o in outs[:2])
  run_max = outs[2] if top_k else None
  # Self was counted if it ranks before the best positive; take it back out.
  self_local = q_self - offset
  self_mine = (q_self >= 0) & (self_local >= 0) & (self_local < size)
  s_self = jnp.take_along_axis(s, jnp.clip(self_local, 0, size - 1)[:, None], axis=1)[:, 0]
  self_before = self_mine & ((s_self > p) | ((s_self == p) & (q_self < jpos)))
  rank = jax.lax.psum(count - self_before.astype(jnp.int32), axis)
  # Near p besides p's own item and self: float32 rounding may order them wrongly.
  self_near = self_mine & (jnp.abs(s_self - p) <= q_tol)
  jpos_mine = (jpos - offset >= 0) & (jpos - offset < size)
  others = n_near - self_near.astype(jnp.int32) - (jpos_mine & (q_tol >= 0)).astype(jnp.int32)
  flag = jax.lax.psum(others, axis) > 0
  if not top_k:
    return rank, flag

  # Top-R pass for MAP@R: local top-k, merged across devices. top_k keeps the lower
  # index first among equal values, and shards are contiguous, so the merged order is
  # the global (score desc, index asc) order.
  pad = max(0, size * num_shards - n_gallery)  # zero rows, at most this many per shard
  k_local = min(top_k + min(pad, size), size)
  v, ix = _top_k_by_runs(s, k_local, run_max)
  ixg = ix + offset
  v = jnp.where(ixg < n_gallery, v, -jnp.inf)
  lab = g_labels[ix]
  was_nan = jnp.take_along_axis(nan, ix, axis=1) if nan is not None else jnp.zeros(ix.shape, bool)
  v = jax.lax.all_gather(v, axis, axis=1, tiled=True)
  ixg = jax.lax.all_gather(ixg, axis, axis=1, tiled=True)
  lab = jax.lax.all_gather(lab, axis, axis=1, tiled=True)
  was_nan = jax.lax.all_gather(was_nan, axis, axis=1, tiled=True)
  if v.shape[1] > top_k:
    v, sel = jax.lax.top_k(v, top_k)
    ixg = jnp.take_along_axis(ixg, sel, axis=1)
    lab = jnp.take_along_axis(lab, sel, axis=1)
    was_nan = jnp.take_along_axis(was_nan, sel, axis=1)
  keep = (ixg != q_self[:, None]) & (v > -jnp.inf)
  pos_in_list = jnp.cumsum(keep, axis=1) - 1  # 0-based rank among non-self items
  r = q_npos[:, None]
  # Neighbours closer than the tolerance among the first R (and the item after them),
  # where their order could matter: a positive next to a negative, or self between two
  # items (swapping items of the same kind changes no metric).
  kind = jnp.where(keep, (lab == q_labels[:, None]).astype(jnp.int32), 2)  # 2: self
  differ = (kind[:, :-1] != kind[:, 1:]) | (kind[:, :-1] == 2) | (kind[:, 1:] == 2)
  close = (v[:, :-1] - v[:, 1:] <= q_tol[:, None]) & (pos_in_list[:, :-1] < r) & differ
  flag = flag | jnp.any(close, axis=1)
  rel = keep & ~was_nan & (lab == q_labels[:, None]) & (pos_in_list < r)
  hits_so_far = jnp.cumsum(rel, axis=1)
  prec = hits_so_far / (pos_in_list + 1).astype(jnp.float32)
  denom = jnp.maximum(q_npos, 1).astype(jnp.float32)
  ap = jnp.sum(jnp.where(rel, prec, 0.0), axis=1) / denom
  rprec = jnp.sum(rel, axis=1) / denom
  p1 = jnp.any(rel & (pos_in_list == 0), axis=1).astype(jnp.float32)
  return rank, flag, ap, rprec, p1


def _top_k_by_runs(s, k, run_max=None):
  """`lax.top_k(s, k)` (same values, same order, same tie rule) at a fraction of its cost.

  The item ranked t-th (score desc, index asc) lies in one of the k runs of _RUN columns
  with the largest maxima (ties: lower run first): each run ranked before its run holds a
  distinct item ranked before it, and fewer than k items are. So take run maxima (a plain
  reduction, or `run_max` `[b, size / _RUN]` if given), the top-k runs, and top-k of their
  k * _RUN scores kept in column order.
  """
  b, size = s.shape
  runs = s.reshape(b, size // _RUN, _RUN)
  n_runs = runs.shape[1]
  if k * 4 >= n_runs:  # little to save
    return jax.lax.top_k(s, k)
  if run_max is None:
    run_max = jnp.max(runs, axis=2)
  _, best = jax.lax.top_k(run_max, k)
  best = jnp.sort(best, axis=1)  # column order, so top_k's position tie-break = index
  cand = jnp.take_along_axis(runs, best[:, :, None], axis=1).reshape(b, k * _RUN)
  cols = (best[:, :, None] * _RUN + jnp.arange(_RUN)[None, None, :]).reshape(b, k * _RUN)
  v, sel = jax.lax.top_k(cand, k)
  return v, jnp.take_along_axis(cols, sel, axis=1)


@functools.lru_cache(maxsize=32)
def _compiled_block(mesh, n_gallery, top_k, may_overflow=True):
  axis = mesh.axis_names
  rep = P()
  fn = functools.partial(
    _block_fn,
    n_gallery=n_gallery,
    top_k=top_k,
    axis=axis,
    num_shards=mesh.devices.size,
    may_overflow=may_overflow,
  )
  n_out = 5 if top_k else 2
  mapped = jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=(rep,) * 6 + (P(axis), P(axis)),
    out_specs=(rep,) * n_out,
    check_vma=False,
  )
  return jax.jit(mapped)


def _block_rows(block_size, nq, shard_rows, block_bytes):
  """Queries per block: `block_size`, lowered so that one block's `[rows, shard_rows]`
  float32 score matrix fits in `block_bytes`, a multiple of 8, and no more than needed."""
  by_memory = max(8, (block_bytes // (4 * shard_rows)) // 8 * 8)
  return max(1, min(block_size, by_memory, -(-nq // 8) * 8))


def _run_blocks(fn, blocks, bs, gallery, rep):
  """Runs `fn` on each block of `bs` rows of the `blocks` arrays; returns its outputs
  concatenated on the host. Two blocks are in flight at a time: the next is dispatched
  while the last one's (small) results come back, and no more score matrices than that
  are alive at once (memory stays bounded however many blocks there are)."""
  outs, in_flight = [], []
  for start in range(0, len(blocks[0]), bs):
    args = [jax.device_put(x[start : start + bs], rep) for x in blocks]
    in_flight.append(fn(*args, *gallery))  # dispatched asynchronously
    if len(in_flight) > 1:
      outs.append([np.asarray(o) for o in in_flight.pop(0)])
  outs.extend([np.asarray(o) for o in res] for res in in_flight)
  return [np.concatenate(c) for c in zip(*outs)]


def _default_mesh():
  return Mesh(np.array(jax.devices()[:1]), ("gallery",))


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

  pos, npos = _positive_lists(ql, gl, self_exclude)
  has_pos = npos > 0
  kw = dict(block_size=block_size, block_bytes=block_bytes, mesh=mesh)
  # The top list: R items (+ self), + 1 to see the gap after the last one.
  top_k = int(npos.max()) + (2 if self_exclude else 1) if map_at_r and has_pos.any() else 0
  top_k = min(top_k, ng)
  finite = rerank.scores_finite(q, g)
  tol = rerank.score_tolerance(q, g) if finite else np.full(nq, -1.0, np.float32)
  q_self = np.arange(nq, dtype=np.int32) if self_exclude else np.full(nq, -1, np.int32)
  cols = _device_pass(q, tol, q_self, pos, npos, ql, g, gl, top_k, not finite, **kw)
  # Queries where float32 rounding could decide an order: ranked again by the same pass
  # in float64 (on the device: GPUs and TPUs do float64 too), tolerance off.
  redo = np.flatnonzero(cols[1] & has_pos)
  if len(redo):
    kw["block_bytes"] = max(1, block_bytes // 2)  # 8-byte scores
    with jax.enable_x64(True):
      again = _device_pass(
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


def _device_pass(
  q,
  tol,
  q_self,
  pos,
  npos,
  ql,
  g,
  gl,
  top_k,
  may_overflow,
  *,
  block_size,
  block_bytes,
  mesh,
  dtype=np.float32,
):
  """All query blocks through `_block_fn`, scores in `dtype`: its outputs `[Nq]` each,
  as host arrays. q_self: `[Nq]` gallery index of each query itself, or -1."""
  nq, ng = q.shape[0], g.shape[0]
  mesh = mesh if mesh is not None else _default_mesh()
  ndev = mesh.devices.size
  # Gallery: padded to whole runs on every device, sharded over the whole mesh.
  g_rows = -(-ng // (ndev * _RUN)) * ndev * _RUN
  g_pad = np.zeros((g_rows, g.shape[1]), dtype)
  g_pad[:ng] = g
  gl_pad = np.zeros((g_rows,), np.int32)
  gl_pad[:ng] = gl.astype(np.int32)
  shard = NamedSharding(mesh, P(mesh.axis_names))
  gallery = (jax.device_put(g_pad, shard), jax.device_put(gl_pad, shard))
  fn = _compiled_block(mesh, ng, top_k, may_overflow)

  # Queries: padded to whole blocks so every block has one shape (one compilation).
  bs = _block_rows(block_size, nq, g_rows // ndev, block_bytes)
  q_rows = -(-nq // bs) * bs

  def padded(x, fill):
    if len(x) == q_rows:
      return x
    out = np.full((q_rows,) + x.shape[1:], fill, x.dtype)
    out[:nq] = x
    return out

  blocks = (padded(q.astype(dtype), 0.0), padded(tol.astype(dtype), -1.0))
  blocks += (padded(q_self, -1), padded(pos, -1))
  blocks += (padded(ql.astype(np.int32), 0), padded(npos, 0))
  cols = _run_blocks(fn, blocks, bs, gallery, NamedSharding(mesh, P()))
  return [c[:nq] for c in cols]


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
