"""The device side of `metrics.retrieval_metrics`: one query block against a sharded gallery.

`device_pass` pads the gallery to whole runs of _RUN rows on every device and the
queries to whole blocks, then runs `block_fn` under `jax.shard_map` on each block (two
in flight). `block_fn` computes the block's `[B, G]` float32 (or float64) scores once
and reads them for the rank of the best positive (Recall@K) and, with `top_k`, for the
top-R list (MAP@R); the definitions and their exactness argument are in `metrics`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BIG_INDEX = np.iinfo(np.int32).max
RUN = 32  # gallery shards are padded to a multiple of this many rows


def block_fn(
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
    # An overflowed score (inf, or NaN from inf - inf) ranks first and is never a hit:
    # as +inf it is counted before any positive, and such a positive is never the best
    # one. Which of the two the same inputs give depends on whether the dot fuses its
    # multiply-adds (1e30 * 1e30 + 1e30 * -1e30: inf - inf = NaN rounded per product,
    # fma(1e30, -1e30, inf) = inf fused), so both are treated alike. Compared against NaN, it would rank nowhere and a NaN best positive
    # would have nothing before it: rank 0, a "hit".
    nan = ~jnp.isfinite(s)
    s = jnp.where(nan, jnp.inf, s)
  else:  # the host proved every score finite: no [B, G] copy, one pass less
    nan = None

  rank, flag, run_max = _rank_of_best_positive(
    s, nan, q_tol, q_self, q_pos, offset=offset, n_gallery=n_gallery, top_k=top_k, axis=axis
  )
  if not top_k:
    return rank, flag
  ap, rprec, p1, close = _top_r(
    s, nan, run_max, q_tol, q_self, q_labels, q_npos, g_labels, offset=offset,
    n_gallery=n_gallery, top_k=top_k, axis=axis, num_shards=num_shards,
  )  # fmt: skip
  return rank, flag | close, ap, rprec, p1


def _rank_of_best_positive(s, nan, q_tol, q_self, q_pos, *, offset, n_gallery, top_k, axis):
  """Rank of each query's best positive in its `[B, G]` score shard `s` (negatives before
  it, summed over the devices), the flag of scores within `q_tol` of it, and (with
  `top_k`) the maxima of runs of RUN columns for the top-R pass."""
  size = s.shape[1]
  # Best positive: gathered from this very matrix, so p is bit-identical to s[i, jpos].
  local = q_pos - offset
  mine = (q_pos >= 0) & (local >= 0) & (local < size)
  vals = jnp.take_along_axis(s, jnp.clip(local, 0, size - 1), axis=1)
  usable = mine
  if nan is not None:  # a NaN positive is never the best one
    usable = mine & ~jnp.take_along_axis(nan, jnp.clip(local, 0, size - 1), axis=1)
  vals = jnp.where(usable, vals, -jnp.inf)
  p = jax.lax.pmax(jnp.max(vals, axis=1), axis)  # [B]; -inf where no positive
  jpos = jnp.where(mine & (vals == p[:, None]), q_pos, BIG_INDEX)
  jpos = jax.lax.pmin(jnp.min(jpos, axis=1), axis)  # [B]

  # One counting pass: items ranked before the best positive. Positives never count
  # (none scores above p, none ties p at a smaller index than jpos), so no label mask.
  col = offset + jnp.arange(size, dtype=jnp.int32)
  pc, jc = p[:, None], jpos[:, None]
  before = ((s > pc) | ((s == pc) & (col[None, :] < jc))) & (col[None, :] < n_gallery)
  # Sum int8 over runs of RUN columns first (a run's count fits int8): on XLA:CPU this
  # fuses compare and sum into one pass at ~5% of the matmul, where a direct int32/float
  # row sum materialises the mask and costs 50-60% of it.
  # Scores within the tolerance of p (p's own item among them): the same read of s.
  near = (jnp.abs(s - pc) <= q_tol[:, None]) & (col[None, :] < n_gallery)
  shape = (s.shape[0], size // RUN, RUN)
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
  return rank, flag, run_max


def _top_r(
  s, nan, run_max, q_tol, q_self, q_labels, q_npos, g_labels, *, offset, n_gallery, top_k,
  axis, num_shards,
):  # fmt: skip
  """Average precision at R, R-precision and precision@1 `[B]` from the top-R list (local
  top-k merged across devices), and the flag of neighbours in it closer than `q_tol`."""
  size = s.shape[1]
  # Top-R pass for MAP@R: local top-k, merged across devices. top_k keeps the lower
  # index first among equal values, and shards are contiguous, so the merged order is
  # the global (score desc, index asc) order.
  pad = max(0, size * num_shards - n_gallery)  # zero rows, at most this many per shard
  k_local = min(top_k + min(pad, size), size)
  v, ix = top_k_by_runs(s, k_local, run_max)
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
  flag = jnp.any(close, axis=1)
  rel = keep & ~was_nan & (lab == q_labels[:, None]) & (pos_in_list < r)
  hits_so_far = jnp.cumsum(rel, axis=1)
  prec = hits_so_far / (pos_in_list + 1).astype(jnp.float32)
  denom = jnp.maximum(q_npos, 1).astype(jnp.float32)
  ap = jnp.sum(jnp.where(rel, prec, 0.0), axis=1) / denom
  rprec = jnp.sum(rel, axis=1) / denom
  p1 = jnp.any(rel & (pos_in_list == 0), axis=1).astype(jnp.float32)
  return ap, rprec, p1, flag


def top_k_by_runs(s, k, run_max=None):
  """`lax.top_k(s, k)` (same values, same order, same tie rule) at a fraction of its cost.

  The item ranked t-th (score desc, index asc) lies in one of the k runs of RUN columns
  with the largest maxima (ties: lower run first): each run ranked before its run holds a
  distinct item ranked before it, and fewer than k items are. So take run maxima (a plain
  reduction, or `run_max` `[b, size / RUN]` if given), the top-k runs, and top-k of their
  k * RUN scores kept in column order.
  """
  b, size = s.shape
  runs = s.reshape(b, size // RUN, RUN)
  n_runs = runs.shape[1]
  if k * 4 >= n_runs:  # little to save
    return jax.lax.top_k(s, k)
  if run_max is None:
    run_max = jnp.max(runs, axis=2)
  _, best = jax.lax.top_k(run_max, k)
  best = jnp.sort(best, axis=1)  # column order, so top_k's position tie-break = index
  cand = jnp.take_along_axis(runs, best[:, :, None], axis=1).reshape(b, k * RUN)
  cols = (best[:, :, None] * RUN + jnp.arange(RUN)[None, None, :]).reshape(b, k * RUN)
  v, sel = jax.lax.top_k(cand, k)
  return v, jnp.take_along_axis(cols, sel, axis=1)


@functools.lru_cache(maxsize=32)
def compiled_block(mesh, n_gallery, top_k, may_overflow=True):
  axis = mesh.axis_names
  rep = P()
  fn = functools.partial(
    block_fn,
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


def block_rows(block_size, nq, shard_rows, block_bytes):
  """Queries per block: `block_size`, lowered so that one block's `[rows, shard_rows]`
  float32 score matrix fits in `block_bytes`, a multiple of 8, and no more than needed."""
  by_memory = max(8, (block_bytes // (4 * shard_rows)) // 8 * 8)
  return max(1, min(block_size, by_memory, -(-nq // 8) * 8))


def run_blocks(fn, blocks, bs, gallery, rep):
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


def default_mesh():
  return Mesh(np.array(jax.devices()[:1]), ("gallery",))


def device_pass(
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
  """All query blocks through `block_fn`, scores in `dtype`: its outputs `[Nq]` each,
  as host arrays. q_self: `[Nq]` gallery index of each query itself, or -1."""
  nq, ng = q.shape[0], g.shape[0]
  mesh = mesh if mesh is not None else default_mesh()
  ndev = mesh.devices.size
  # Gallery: padded to whole runs on every device, sharded over the whole mesh.
  g_rows = -(-ng // (ndev * RUN)) * ndev * RUN
  g_pad = np.zeros((g_rows, g.shape[1]), dtype)
  g_pad[:ng] = g
  gl_pad = np.zeros((g_rows,), np.int32)
  gl_pad[:ng] = gl.astype(np.int32)
  shard = NamedSharding(mesh, P(mesh.axis_names))
  gallery = (jax.device_put(g_pad, shard), jax.device_put(gl_pad, shard))
  fn = compiled_block(mesh, ng, top_k, may_overflow)

  # Queries: padded to whole blocks so every block has one shape (one compilation).
  bs = block_rows(block_size, nq, g_rows // ndev, block_bytes)
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
  cols = run_blocks(fn, blocks, bs, gallery, NamedSharding(mesh, P()))
  return [c[:nq] for c in cols]
