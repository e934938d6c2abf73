"""A cross-batch memory sharded over the devices of a mesh axis.

A replicated memory of 10M x 128 float32 is 5 GB on *every* device. With
`memory_sharding="sharded"` each of the `n` devices holds `size / n` rows
instead, and enqueues its own local batch into its own shard (no gather).

Representation: the same `MemoryState` pytree as `xbm_jax.memory`, with
global shapes and every leaf sharded `P(axis)` on its first dimension:

    emb    [size, dim]  rows of shard d are d*k .. d*k + k-1   (k = size / n)
    labels [size] int32
    valid  [size] bool
    ptr    [n]    int32  ptr[d] is shard d's own ring pointer (local slot)

Inside `shard_map` each device therefore sees an ordinary memory of `k` rows
whose `ptr` has shape `[1]`. Each shard is an independent FIFO ring. The
*global slot id* of local slot j on device d is `d * k + j`, i.e. the row of
the global array: that is the index `self_exclusion="index"` uses.

Relation to a replicated memory fed the same global batches (the global batch
is the device-major concatenation of the local batches, as `all_gather`
builds it): while nothing wraps, or whenever the local batch `b` divides `k`,
both memories hold the same entries, and `to_replicated(mem, local_batch=b)`
rebuilds the replicated memory exactly (same slots, same pointer). Otherwise
each shard evicts its own oldest rows, so the two hold the same entries only
approximately (the newest `size - n*b` rows always agree). All losses are
permutation-invariant over the reference, so slot order only matters for
`self_exclusion="index"`.

    mesh = jax.make_mesh((8,), ("data",))
    mem = sharded_memory.init(size=1_000_000, dim=128, n_shards=8, mesh=mesh)
    # inside shard_map(..., in_specs=sharded_memory.specs()):
    mem = sharded_memory.enqueue_local(mem, local_batch)
    # checkpoints: save the global arrays; restore onto any device count with
    mem = sharded_memory.restore(numpy_arrays, mesh)   # reshards if n differs
"""

from __future__ import annotations

from typing import Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from xbm_jax import memory as memory_lib
from xbm_jax.embeddings import Embeddings
from xbm_jax.memory import MemoryState

# The values of config.xbm.memory_sharding (train/validation.py reads them here).
MEMORY_SHARDING = ("replicated", "sharded")


def _check_divisible(size: int, n_shards: int) -> int:
  if n_shards <= 0:
    raise ValueError(f"n_shards must be positive; got {n_shards}")
  if size % n_shards:
    raise ValueError(
      f"memory size {size} must be divisible by the number of devices "
      f"{n_shards} for memory_sharding='sharded' (try size="
      f"{(size // n_shards + 1) * n_shards})"
    )
  return size // n_shards


def init(
  *,
  size: int,
  dim: int,
  n_shards: int,
  dtype=jnp.float32,
  mesh=None,
  axis_name: str = "data",
  ids: bool = False,
) -> MemoryState:
  """An empty sharded memory with global shapes (see module doc).

  Returns a `MemoryState` with emb `[size, dim]` zeros, labels `[size]` int32,
  valid `[size]` bool and ptr `[n_shards]` int32. With `mesh`, every leaf is
  created already split over `axis_name` (no device ever holds the whole
  memory); without, it is unplaced: shard it with `put(mem, mesh)`.
  """
  size, n_shards = int(size), int(n_shards)
  _check_divisible(size, n_shards)
  if mesh is not None and mesh.shape[axis_name] != n_shards:
    raise ValueError(
      f"n_shards={n_shards} does not match mesh axis {axis_name!r} of size {mesh.shape[axis_name]}"
    )
  make = lambda: memory_lib.init(size=size, dim=dim, dtype=dtype, ids=ids)._replace(
    ptr=jnp.zeros((n_shards,), jnp.int32)
  )
  if mesh is None:
    return make()
  return jax.jit(make, out_shardings=shardings(mesh, axis_name, ids=ids))()


def specs(axis_name: str = "data", *, ids: bool = False) -> MemoryState:
  """`MemoryState` of `PartitionSpec`s: every leaf split on its first axis (`ids`:
  for a memory that stores image ids)."""
  split = P(axis_name)
  return MemoryState(split, split, split, split, split if ids else None)


def shardings(mesh, axis_name: str = "data", *, ids: bool = False) -> MemoryState:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs(axis_name, ids=ids))


def put(mem: MemoryState, mesh, axis_name: str = "data") -> MemoryState:
  """Places a global-shaped sharded memory on `mesh` (rows split over `axis_name`)."""
  n = mesh.shape[axis_name]
  if mem.ptr.shape != (n,):
    raise ValueError(
      f"sharded memory ptr must be [{n}] (one pointer per device on axis "
      f"{axis_name!r}); got shape {tuple(mem.ptr.shape)}: use reshard()"
    )
  _check_divisible(mem.emb.shape[0], n)
  return jax.device_put(mem, shardings(mesh, axis_name, ids=mem.ids is not None))


def enqueue_local(
  local_mem: MemoryState, local_batch: Embeddings, *, when=True, mask=None
) -> MemoryState:
  """Writes this device's `[b, dim]` batch into its own shard (call inside shard_map).

  `local_mem` is the per-device view: emb `[k, dim]`, ptr `[1]` int32.
  Same semantics as `memory.enqueue` (stop_gradient, invalid rows take a slot,
  traced `when`, `mask` `[b]` bool selects the rows written, each shard a true
  ring of its own device's selected rows); needs b <= k.
  """
  if local_mem.ptr.shape != (1,):
    raise ValueError(
      f"enqueue_local expects the per-device shard (ptr shape [1]); got "
      f"ptr shape {tuple(local_mem.ptr.shape)}: call it inside shard_map "
      "with in_specs=sharded_memory.specs()"
    )
  out = memory_lib.enqueue(_one_ring(local_mem), local_batch, when=when, mask=mask)
  return out._replace(ptr=out.ptr[None])


def _one_ring(local_mem: MemoryState) -> MemoryState:
  """The per-device shard as an ordinary memory (scalar ptr)."""
  return local_mem._replace(ptr=local_mem.ptr[0])


def local_next_slots(
  local_mem: MemoryState, batch_size: int, *, axis_name: str = "data", when=True, mask=None
) -> jax.Array:
  """`[b]` int32 *global* slot ids the next `enqueue_local` of b rows writes (-1
  for rows it does not write), read before it (inside shard_map)."""
  k = local_mem.emb.shape[0]
  local = memory_lib.next_slots(_one_ring(local_mem), batch_size, when=when, mask=mask)
  return jnp.where(local >= 0, jax.lax.axis_index(axis_name) * k + local, -1).astype(jnp.int32)


def local_last_slots(
  local_mem: MemoryState, batch_size: int, *, axis_name: str = "data"
) -> jax.Array:
  """`[b]` int32 *global* slot ids written by this device's latest enqueue of b rows
  (inside shard_map); pass them as `self_index=` with `self_exclusion="index"`."""
  k = local_mem.emb.shape[0]
  local = memory_lib.last_slots(_one_ring(local_mem), batch_size)
  return (jax.lax.axis_index(axis_name) * k + local).astype(jnp.int32)


def _age_order(ptr: np.ndarray, k: int) -> np.ndarray:
  """`[n, k]` local rows of each shard, oldest first (ring order from its pointer)."""
  return (np.asarray(ptr).reshape(-1, 1) + np.arange(k)[None, :]) % k


def to_replicated(mem: MemoryState, *, local_batch: int) -> MemoryState:
  """The replicated memory (scalar ptr) that the same global batches would have built.

  Exact when `local_batch` divides the shard size k and every shard enqueued
  the same number of rows (the train step does). Raises ValueError otherwise.
  A host-side helper (tests, checkpoints, inspection; not jittable): takes
  global arrays (host or device) and returns numpy arrays, ptr a `[]` int32.
  """
  n = int(np.size(mem.ptr))
  size = mem.emb.shape[0]
  k = _check_divisible(size, n)
  b = int(local_batch)
  if b <= 0 or k % b:
    raise ValueError(
      f"to_replicated needs local_batch ({b}) to divide the shard size "
      f"{k}; otherwise shards wrap at different global slots"
    )
  ptr = np.asarray(mem.ptr)
  if not (ptr == ptr[0]).all():
    raise ValueError(f"to_replicated needs equal shard pointers; got {ptr.tolist()}")
  c = k // b

  def relayout(x):  # shard-major [n, c, b, ...] -> chunk-major [c, n, b, ...]
    x = np.asarray(jax.device_get(x))
    x = x.reshape((n, c, b) + x.shape[1:])
    return np.swapaxes(x, 0, 1).reshape((size,) + x.shape[3:])

  return MemoryState(
    relayout(mem.emb),
    relayout(mem.labels),
    relayout(mem.valid),
    np.asarray(int(ptr[0]) * n % size, np.int32),
    None if mem.ids is None else relayout(mem.ids),
  )


def from_replicated(mem: MemoryState, *, n_shards: int, local_batch: int) -> MemoryState:
  """The inverse of `to_replicated` (host-side, numpy out): the sharded memory
  (global shapes) whose `to_replicated(..., local_batch)` is `mem`. Needs
  `n_shards * local_batch` to divide the replicated pointer and `local_batch`
  to divide size / n_shards."""
  size = mem.emb.shape[0]
  n, b = int(n_shards), int(local_batch)
  k = _check_divisible(size, n)
  if b <= 0 or k % b:
    raise ValueError(f"from_replicated needs local_batch ({b}) to divide the shard size {k}")
  ptr = int(np.asarray(mem.ptr))
  if ptr % (n * b):
    raise ValueError(
      f"replicated pointer {ptr} is not a multiple of the global batch "
      f"{n * b}; such a memory has no per-shard equivalent"
    )
  c = k // b

  def relayout(x):  # chunk-major [c, n, b, ...] -> shard-major [n, c, b, ...]
    x = np.asarray(jax.device_get(x))
    x = x.reshape((c, n, b) + x.shape[1:])
    return np.swapaxes(x, 0, 1).reshape((size,) + x.shape[3:])

  return MemoryState(
    relayout(mem.emb),
    relayout(mem.labels),
    relayout(mem.valid),
    np.full((n,), ptr // n, np.int32),
    None if mem.ids is None else relayout(mem.ids),
  )


ArrayTree = Union[MemoryState, Mapping[str, np.ndarray]]


def reshard(saved: ArrayTree, n_new: int) -> MemoryState:
  """Re-lays a saved memory (host arrays from a checkpoint) onto `n_new` shards.

  `saved` is a `MemoryState` or a mapping with keys emb/labels/valid/ptr; a
  scalar ptr is a replicated memory (one ring), a `[n_old]` ptr a sharded one.
  Semantics: the entries are put in one global age order, oldest first: rank r
  of every old shard (its r-th oldest row, counted from its pointer) before
  rank r+1, old shards in device order within a rank (rows of equal rank were
  written by the same step). That stream is dealt round-robin to the new
  shards, so each new shard holds k_new = size / n_new rows, oldest first from
  local row 0, with ptr 0. Every entry survives, and the next enqueues on all
  shards evict the globally oldest entries first (never-written slots, being
  the oldest, first of all). Resharding to the same n is transparent: later
  enqueues hold the same set of entries as without it.

  Returns a global-shaped `MemoryState` of numpy arrays (ptr `[n_new]`); place
  it with `put(mem, mesh)`. `n_new=1` gives a single ring (ptr `[1]`); index
  `ptr[0]` for an ordinary replicated memory.
  """
  get = _getter(saved)
  emb, labels, valid = (np.asarray(get(key)) for key in ("emb", "labels", "valid"))
  ptr = np.asarray(get("ptr")).reshape(-1)
  ids = get("ids")
  size = emb.shape[0]
  if labels.shape != (size,) or valid.shape != (size,):
    raise ValueError(
      f"saved memory leaves disagree: emb {emb.shape}, labels {labels.shape}, valid {valid.shape}"
    )
  n_old = ptr.shape[0]
  k_old = _check_divisible(size, n_old)
  k_new = _check_divisible(size, int(n_new))
  # stream[r * n_old + d] = global row of shard d's r-th oldest entry.
  rows = _age_order(ptr, k_old) + (np.arange(n_old) * k_old)[:, None]
  stream = rows.T.reshape(-1)
  # new global row of stream position i: shard i % n_new, local slot i // n_new.
  i = np.arange(size)
  dest = (i % n_new) * k_new + i // n_new
  order = np.empty(size, np.int64)
  order[dest] = stream
  return MemoryState(
    emb[order],
    labels[order],
    valid[order],
    np.zeros((int(n_new),), np.int32),
    None if ids is None else np.asarray(ids)[order],
  )


def _getter(saved: ArrayTree):
  """key -> leaf of a saved memory (None for the optional `ids` when absent, also
  when saved as `np.asarray(None)`)."""
  get = (lambda key: getattr(saved, key)) if isinstance(saved, MemoryState) else saved.get

  def leaf(key):
    value = get(key)
    if key == "ids" and (value is None or np.ndim(value) == 0):
      return None
    if value is None:
      raise KeyError(f"saved memory has no {key!r}")
    return value

  return leaf


def restore(saved: ArrayTree, mesh, axis_name: str = "data") -> MemoryState:
  """A saved memory (host arrays, e.g. restored from a checkpoint as numpy)
  placed on `mesh`: as saved when it has one pointer per device of
  `axis_name`, else re-laid by `reshard` (another device count, or a
  replicated memory with a scalar ptr)."""
  n = mesh.shape[axis_name]
  ptr = saved.ptr if isinstance(saved, MemoryState) else saved["ptr"]
  if np.shape(ptr) == (n,):
    get = _getter(saved)
    mem = MemoryState(
      *(None if get(k) is None else np.asarray(get(k)) for k in MemoryState._fields)
    )
  else:
    mem = reshard(saved, n)
  return put(mem, mesh, axis_name)
