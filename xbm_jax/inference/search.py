"""Exact top-k inner-product search, sharded over devices; faiss when asked.

`ExactSearcher(gallery)` lays the `[N, D]` gallery out over a 1-D mesh (padded to whole
runs of `blockwise.RUN` rows per device, as `blockwise.device_pass` does) once, then
`search(queries, k)` runs blocks of queries through one `shard_map`ped function (two in
flight, `blockwise.run_blocks`): each device scores its shard in float32
(`Precision.HIGHEST`), keeps its top k (`blockwise.top_k_by_runs`: exactly
`lax.top_k`), and the `devices x k` candidates are merged by `lax.top_k`.

Order: descending score, ties by ascending gallery index. `lax.top_k` keeps the lower
position first among equal values, each device's list is in that order and shards are
contiguous in index, so the merged list is in it too (the argument of `metrics`' MAP@R).
The result is `np.argsort(-s, kind="stable")[:, :k]` of the float32 scores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xbm_jax.evaluation import blockwise


def _block(q, g, *, n_gallery, k, axis):
  """Per device: `[B, D]` queries (replicated) against the `[G, D]` shard ->
  the best k overall `([B, k] float32 scores, [B, k] int32 gallery indices)`."""
  size = g.shape[0]
  offset = jax.lax.axis_index(axis) * size
  s = jax.lax.dot_general(q, g, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
  col = offset + jnp.arange(size, dtype=jnp.int32)
  s = jnp.where(col[None, :] < n_gallery, s, -jnp.inf)  # padding rows never win
  v, ix = blockwise.top_k_by_runs(s, min(k, size))
  v = jax.lax.all_gather(v, axis, axis=1, tiled=True)
  ix = jax.lax.all_gather(ix + offset, axis, axis=1, tiled=True)
  v, sel = jax.lax.top_k(v, k)
  return v, jnp.take_along_axis(ix, sel, axis=1)


@functools.lru_cache(maxsize=16)
def _compiled(mesh, n_gallery, k):
  axis = mesh.axis_names
  fn = functools.partial(_block, n_gallery=n_gallery, k=k, axis=axis)
  mapped = jax.shard_map(
    fn, mesh=mesh, in_specs=(P(), P(axis)), out_specs=(P(), P()), check_vma=False
  )
  return jax.jit(mapped)


def local_mesh() -> Mesh:
  """Every local device on one axis (the gallery is split over all of them)."""
  return Mesh(np.array(jax.local_devices()), ("gallery",))


class ExactSearcher:
  """The gallery on the devices, for repeated exact searches.

  Args:
    gallery: float32 `[N, D]`, N >= 1.
    mesh: a 1-D mesh (default every local device).
    block_size: queries per block at most; block_bytes: bound on one block's
      `[rows, N / devices]` float32 score matrix (fewer rows where needed).
  """

  def __init__(self, gallery, *, mesh=None, block_size: int = 1024, block_bytes: int = 256 << 20):
    g = np.asarray(gallery, np.float32)
    self.n, self.dim = g.shape
    self.mesh = mesh if mesh is not None else local_mesh()
    ndev = self.mesh.devices.size
    rows = -(-self.n // (ndev * blockwise.RUN)) * ndev * blockwise.RUN
    if rows != self.n:  # whole runs on every device; padded rows score -inf
      g = np.concatenate([g, np.zeros((rows - self.n, self.dim), np.float32)])
    self.shard_rows = rows // ndev
    self.gallery = (jax.device_put(g, NamedSharding(self.mesh, P(self.mesh.axis_names))),)
    self.block_size, self.block_bytes = block_size, block_bytes

  def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`[Q, D]` -> `(scores float32 [Q, k'], indices int64 [Q, k'])`, k' = min(k, N)."""
    q = np.asarray(queries, np.float32)
    k = min(int(k), self.n)
    nq = q.shape[0]
    if nq == 0:
      return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    # One block's scores plus top_k's working copy: bound them by block_bytes.
    bs = blockwise.block_rows(self.block_size, nq, self.shard_rows, self.block_bytes // 2)
    q_rows = -(-nq // bs) * bs
    if q_rows != nq:  # whole blocks: one shape, one compilation
      q = np.concatenate([q, np.zeros((q_rows - nq, self.dim), np.float32)])
    fn = _compiled(self.mesh, self.n, k)
    v, ix = blockwise.run_blocks(fn, (q,), bs, self.gallery, NamedSharding(self.mesh, P()))
    return v[:nq], ix[:nq].astype(np.int64)


def faiss_available() -> bool:
  try:
    import faiss  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


class FaissSearcher:
  """`faiss.IndexFlatIP` (exact inner product on the CPU); within its k results, equal
  scores are put in index order (which tied item faiss keeps at the k-th place is its own)."""

  def __init__(self, gallery):
    import faiss  # pylint: disable=g-import-not-at-top

    g = np.ascontiguousarray(gallery, np.float32)
    self.n, self.dim = g.shape
    self.index = faiss.IndexFlatIP(self.dim)
    self.index.add(g)

  def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(int(k), self.n)
    v, ix = self.index.search(np.ascontiguousarray(queries, np.float32), k)
    order = np.lexsort((ix, -v), axis=1)  # score desc, then index asc
    return np.take_along_axis(v, order, 1), np.take_along_axis(ix, order, 1).astype(np.int64)


BACKENDS = ("exact", "faiss")


def make_searcher(gallery, *, backend: str = "exact", mesh=None):
  if backend == "exact":
    return ExactSearcher(gallery, mesh=mesh)
  if backend == "faiss":
    if not faiss_available():
      raise ImportError("backend 'faiss' needs faiss (pip install faiss-cpu==1.15.1)")
    return FaissSearcher(gallery)
  raise ValueError(f"unknown search backend {backend!r}; valid: {', '.join(BACKENDS)}")
