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
both memories hold the same entries in another slot order. Otherwise each
shard evicts its own oldest rows, so the two hold the same entries only
approximately (the newest `size - n*b` rows always agree). All losses are
permutation-invariant over the reference, so slot order only matters for
`self_exclusion="index"`.

    mesh = jax.make_mesh((8,), ("data",))
    mem = sharded_memory.init(size=1_000_000, dim=128, n_shards=8, mesh=mesh)
    # inside shard_map(..., in_specs=sharded_memory.specs()):
    mem = sharded_memory.enqueue_local(mem, local_batch)
    # checkpoints: save the global arrays; restore onto any device count with
    mem = sharded_memory.restore(numpy_arrays, mesh)   # reshards if n differs
    # or shard by shard, from blocks read straight onto the new mesh:
    mem = sharded_memory.reshard_on_mesh(blocks, saved_ptr, mesh)
"""

from __future__ import annotations

import functools
from typing import Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from xbm_jax.memory import ring as memory_lib
from xbm_jax.embeddings import Embeddings
from xbm_jax.memory.ring import MemoryState

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


def reshard_on_mesh(blocks: MemoryState, saved_ptr, mesh, axis_name: str = "data") -> MemoryState:
  """`reshard(saved, n)` computed on the mesh, one shard's worth of rows at a time.

  For a checkpoint restored straight onto the new layout: orbax reads each
  device's contiguous block of the saved rows (the new shardings cut the saved
  arrays into `n` blocks of k = size / n rows), and this re-lays them, on device,
  into `reshard`'s order (the same result, bit for bit). The saved memory is never
  whole on one device or host: in n rounds the blocks pass around the ring of
  devices (`ppermute`), and each device keeps, of the block it holds, the rows its
  new shard takes. Peak per device: a few blocks of k rows (its block, the one
  received, its new shard: 3 in XLA's memory analysis, the blocks donated);
  traffic per device: the whole memory once.

  Args:
    blocks: a `MemoryState` with global shapes (emb `[size, dim]`, labels, valid,
      optional ids `[size]`) holding the saved rows as saved, each leaf split
      `P(axis_name)` on `mesh`; its `ptr` is ignored. Its arrays are donated
      (deleted: their buffers become the result's).
    saved_ptr: the saved pointer, host `[n_old]` int (`[]` for a replicated memory).
    mesh, axis_name: the new layout (n devices on `axis_name`).
  Returns:
    The re-laid memory, every leaf split `P(axis_name)`, ptr `[n]` zeros.
  """
  n = mesh.shape[axis_name]
  ptr = np.asarray(saved_ptr, np.int32).reshape(-1)
  _check_divisible(blocks.emb.shape[0], ptr.shape[0])
  _check_divisible(blocks.emb.shape[0], n)
  rows = [blocks.emb, blocks.labels, blocks.valid] + ([] if blocks.ids is None else [blocks.ids])
  ptr = jax.device_put(ptr, NamedSharding(mesh, P()))  # the same on every process
  moved = relayout_program(mesh, axis_name, len(rows))(ptr, *rows)
  new_ptr = jax.device_put(np.zeros((n,), np.int32), NamedSharding(mesh, P(axis_name)))
  return MemoryState(*moved[:3], new_ptr, moved[3] if blocks.ids is not None else None)


@functools.lru_cache(maxsize=None)
def relayout_program(mesh, axis_name: str, n_leaves: int):
  """The jitted re-lay of `reshard_on_mesh`: `(saved ptr [n_old], *leaves split
  P(axis_name)) -> leaves re-laid` (exposed so that its per-device memory can be
  read from the compiled program: benchmarks/reshard_restore.py)."""
  n = mesh.shape[axis_name]
  shift = [(s, (s + 1) % n) for s in range(n)]

  def per_device(ptr, *held):
    k = held[0].shape[0]  # this device's rows
    n_old = ptr.shape[0]
    k_old = k * n // n_old
    # reshard's order in closed form: new row l of shard j is stream position
    # i = l * n + j, the (i // n_old)-th oldest row of old shard i % n_old.
    i = jnp.arange(k) * n + jax.lax.axis_index(axis_name)
    old_shard = i % n_old
    src = old_shard * k_old + (ptr[old_shard] + i // n_old) % k_old
    owner, local = src // k, src % k

    def round_(t, carry):  # holds the block of device (j - t) mod n
      held, out = carry
      mine = owner == (jax.lax.axis_index(axis_name) - t) % n
      out = tuple(
        jnp.where(mine.reshape((k,) + (1,) * (h.ndim - 1)), h[local], o) for h, o in zip(held, out)
      )
      return tuple(jax.lax.ppermute(h, axis_name, shift) for h in held), out

    _, out = jax.lax.fori_loop(0, n, round_, (held, tuple(jnp.zeros_like(h) for h in held)))
    return out

  spec = P(axis_name)
  return jax.jit(
    jax.shard_map(
      per_device, mesh=mesh, in_specs=(P(),) + (spec,) * n_leaves, out_specs=(spec,) * n_leaves
    ),
    donate_argnums=tuple(range(1, n_leaves + 1)),  # the blocks become the new shards
  )
