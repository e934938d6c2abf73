"""Head re-projection: the memory keeps pooled backbone features, embedded by the current head.

XBM's memory stores embeddings computed by the parameters of the step that
wrote them. This variant stores the backbone's pooled features instead (e.g.
`[55_000, 2048]` for ResNet-50) and, whenever the memory term needs embeddings,
runs them through the *current* head (Dense + L2 normalisation). The head's
share of the drift is therefore removed exactly; the backbone's share stays
(the features are as old as before).

    mem = reprojection.init(size=55_000, feature_dim=2048)          # bf16 rows
    (pooled, emb), upd = model.apply(variables, images, train=True,
                                     mutable=["batch_stats"],
                                     method="features_and_embeddings")
    mem = memory.enqueue(mem, Embeddings(pooled, labels))            # or enqueue_local
    head = reprojection.head_projection(model, params)
    reference = reprojection.embeddings(mem, head, chunk_rows=4096)  # [size, D]
    ... the memory loss of (emb, labels) against `reference` ...

(enqueue first, then the loss, as the reference XBM does: the batch's own rows
come back as its embeddings, up to the storage's rounding.)

The state is an ordinary `MemoryState` whose `emb` holds features, so enqueue,
checkpointing, sharding (`sharded_memory.enqueue_local`, `reshard`, `restore`)
and the pointer arithmetic are the memory's own. `embeddings` returns a
`MemoryState` of unit rows that every loss accepts as a reference set. Inside
`shard_map` each device projects its own `[size / n, F]` rows: the projection
is row by row, so nothing is gathered.

Cost: no extra forward through the backbone; per step one `[size, F] x [F, D]`
matmul (2 * size * F * D flops), and the bytes `memory_bytes` states.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from xbm_jax import memory as memory_lib
from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.memory import MemoryState

# The dtypes the features may be stored in (bf16 halves the memory; its rounding
# is bounded in `embeddings`' docstring).
STORAGE_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
_F32_BYTES = 4


def storage_dtype(dtype) -> jnp.dtype:
  """`dtype` (a name or a dtype) as one of `STORAGE_DTYPES`; a TypeError otherwise."""
  try:
    resolved = jnp.dtype(STORAGE_DTYPES.get(dtype, dtype))
  except TypeError:
    resolved = None
  if resolved not in [jnp.dtype(d) for d in STORAGE_DTYPES.values()]:
    raise TypeError(f"feature memory dtype must be one of {sorted(STORAGE_DTYPES)}; got {dtype}")
  return resolved


def init(
  *,
  size: int,
  feature_dim: int,
  dtype=jnp.bfloat16,
  ids: bool = False,
  n_shards: Optional[int] = None,
  mesh=None,
  axis_name: str = "data",
) -> MemoryState:
  """An empty memory of `size` rows of `feature_dim` pooled features.

  Returns a `MemoryState` with emb `[size, feature_dim]` in `dtype` (bfloat16 by
  default, or float32). Without `n_shards` it is the replicated memory
  (`memory.init`); with `n_shards` the sharded one (`sharded_memory.init`: ptr
  `[n_shards]`, placed on `mesh` when given).
  """
  dtype = storage_dtype(dtype)
  if int(feature_dim) <= 0:
    raise ValueError(f"feature_dim must be positive; got {feature_dim}")
  if n_shards is None:
    return memory_lib.init(size=size, dim=feature_dim, dtype=dtype, ids=ids)
  return sharded_memory.init(
    size=size,
    dim=feature_dim,
    n_shards=n_shards,
    dtype=dtype,
    mesh=mesh,
    axis_name=axis_name,
    ids=ids,
  )


def head_projection(model, params) -> Callable[[jax.Array], jax.Array]:
  """`[N, F]` pooled features -> `[N, D]` unit rows through `model`'s current head.

  `model` is an `xbm_jax.models.EmbeddingModel` (its `project_features`) and
  `params` its params (only `params["head"]` is read). Under `jax.grad`, the
  gradient reaches `params["head"]` unless `embeddings(..., detach=True)`.
  """
  head = {"params": {"head": params["head"]}}
  return lambda pooled: model.apply(head, pooled, method="project_features")


def embeddings(
  mem: MemoryState,
  project: Callable[[jax.Array], jax.Array],
  *,
  chunk_rows: Optional[int] = None,
  detach: bool = True,
) -> MemoryState:
  """The stored features embedded by `project` (the current head): a reference set.

  Args:
    mem: a feature memory, emb `[k, F]` (inside shard_map: this device's shard).
    project: `[n, F]` features -> `[n, D]` float unit rows, e.g.
      `head_projection(model, params)`; the stored dtype is passed as it is (the
      model's head computes in float32).
    chunk_rows: project this many rows at a time (`lax.map`), so that the float32
      copy of bf16 features the head's matmul reads is `[chunk_rows, F]`, not
      `[k, F]`; None projects all rows at once. Does not change the result
      beyond float rounding of the matmul.
    detach: stop the gradient at the result (XBM's memory is a constant
      reference set); False lets the memory term's gradient reach the head.
  Returns:
    A `MemoryState` with emb `[k, D]` float32 (invalid rows zero) and the
    memory's labels, valid, ptr and ids. Raises ValueError at trace time for a
    memory that is not `[k, F]` float, a bad `chunk_rows`, or a `project` whose
    output is not `[n, D]` float.

  bfloat16 storage: each stored feature is `f (1 + e)` with `|e| <= 2^-8`
  (round to nearest, 8 significant bits), so the pre-normalisation row `z = f W + b`
  moves by at most `dz = 2^-8 |f| |W|` (elementwise absolute values), and its
  unit row by at most `2 ||dz|| / ||z||` (the map z -> z / ||z|| moves a point by at
  most twice the relative change of z), plus the float32 rounding of the matmul.
  """
  if mem.emb.ndim != 2 or not jnp.issubdtype(mem.emb.dtype, jnp.floating):
    raise ValueError(
      f"the feature memory must be [k, F] float; got {mem.emb.dtype} {tuple(mem.emb.shape)}"
    )
  rows, feature_dim = mem.emb.shape
  chunk = rows if chunk_rows is None else int(chunk_rows)
  if chunk <= 0:
    raise ValueError(f"chunk_rows must be positive; got {chunk_rows}")
  chunk = min(chunk, rows)
  out = jax.eval_shape(project, jax.ShapeDtypeStruct((chunk, feature_dim), mem.emb.dtype))
  if out.ndim != 2 or out.shape[0] != chunk or not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(
      f"project must map [{chunk}, {feature_dim}] features to [{chunk}, D] float rows; "
      f"got {out.dtype} {tuple(out.shape)}"
    )
  emb = _project_in_chunks(jax.lax.stop_gradient(mem.emb), project, chunk)
  if detach:
    emb = jax.lax.stop_gradient(emb)
  return mem._replace(emb=jnp.where(mem.valid[:, None], emb, 0.0))


def _project_in_chunks(features: jax.Array, project, chunk: int) -> jax.Array:
  """`project` over `[n, F]` rows, `chunk` rows at a time (`lax.map`), as `[n, D]` float32.

  Each chunk is a dynamic slice of the stored rows (no padded copy of the memory);
  the last one starts at `n - chunk`, overlapping the one before it, and only its
  rows past that overlap are kept.
  """
  n = features.shape[0]
  if chunk >= n:
    return project(features).astype(jnp.float32)
  n_chunks = -(-n // chunk)
  starts = jnp.minimum(jnp.arange(n_chunks) * chunk, n - chunk)
  take = lambda start: project(jax.lax.dynamic_slice_in_dim(features, start, chunk))
  out = jax.lax.map(take, starts).astype(jnp.float32)  # [n_chunks, chunk, D]
  overlap = n_chunks * chunk - n
  if not overlap:
    return out.reshape(n, out.shape[-1])
  return jnp.concatenate([out[:-1].reshape(-1, out.shape[-1]), out[-1, overlap:]])


class MemoryBytes(NamedTuple):
  """Bytes one device holds for a feature memory (all Python ints).

  Attributes:
    rows: rows on the device (`size / n_shards`).
    stored: `rows x feature_dim x itemsize`, the features (held for the whole run).
    projected: `rows x embed_dim x 4`, the float32 embeddings `embeddings` returns
      (transient, live while the memory term runs; when `chunk_rows` does not
      divide the rows, the stacked chunks and their concatenation may be live at
      once, up to twice this).
    upcast: `chunk x feature_dim x 4`, the float32 copy of one chunk of bf16
      features the head's matmul may read (0 for float32 storage; an upper bound:
      the compiler may fuse the conversion into the matmul).
    total: the sum of the three. Labels, validity and pointer (5 bytes a row)
      are the same as any memory's and not counted.
  """

  rows: int
  stored: int
  projected: int
  upcast: int
  total: int


def memory_bytes(
  *,
  size: int,
  feature_dim: int,
  embed_dim: int,
  dtype=jnp.bfloat16,
  n_shards: int = 1,
  chunk_rows: Optional[int] = None,
) -> MemoryBytes:
  """The per-device bytes of a feature memory and its projection (see `MemoryBytes`).

  E.g. ResNet-50 features, 55,000 rows, bf16, D = 128, one device, chunks of 4,096:
  stored 225,280,000 + projected 28,160,000 + upcast 33,554,432 bytes.
  """
  dtype = storage_dtype(dtype)
  size, feature_dim, embed_dim, n_shards = map(int, (size, feature_dim, embed_dim, n_shards))
  if min(size, feature_dim, embed_dim, n_shards) <= 0:
    raise ValueError(
      f"size, feature_dim, embed_dim and n_shards must be positive; got "
      f"{size}, {feature_dim}, {embed_dim}, {n_shards}"
    )
  if size % n_shards:
    raise ValueError(f"memory size {size} must be divisible by n_shards {n_shards}")
  rows = size // n_shards
  chunk = rows if chunk_rows is None else min(int(chunk_rows), rows)
  stored = rows * feature_dim * dtype.itemsize
  projected = rows * embed_dim * _F32_BYTES
  upcast = 0 if dtype.itemsize >= _F32_BYTES else chunk * feature_dim * _F32_BYTES
  return MemoryBytes(rows, stored, projected, upcast, stored + projected + upcast)


def check_fits(*, budget_bytes: int, **sizes) -> MemoryBytes:
  """`memory_bytes(**sizes)` when its total fits `budget_bytes` per device; else a
  one-line ValueError naming the sizes (rows x features x bytes, and the budget)."""
  cost = memory_bytes(**sizes)
  if cost.total > int(budget_bytes):
    dtype = storage_dtype(sizes.get("dtype", jnp.bfloat16))
    raise ValueError(
      f"head re-projection memory needs {cost.total:,} bytes per device "
      f"({cost.rows:,} rows x {sizes['feature_dim']} features x {dtype.itemsize} bytes "
      f"({dtype.name}) = {cost.stored:,} stored + {cost.projected:,} projected + "
      f"{cost.upcast:,} upcast), over the budget of {int(budget_bytes):,} bytes; "
      "use fewer rows, more shards, bfloat16 or a smaller chunk_rows"
    )
  return cost
