"""The cross-batch memory: a functional FIFO ring buffer of detached embeddings.

XBM (Wang et al., CVPR 2020, Sec. 3.3) keeps the embeddings of past batches and
scores the current batch against them. Here the memory is a small pytree with
static shapes, so it lives in the jitted train state next to the parameters,
works under `jit`, `grad`, `shard_map` and buffer donation, and never
recompiles as it fills.

    mem = memory.init(size=55_000, dim=128)
    mem = memory.enqueue(mem, Embeddings(emb, labels))

Unlike the reference code: the size and dim are arguments (not 128), "full" is
tracked by a validity mask (label 0 is an ordinary label), and wrap-around is a
true modular ring (the reference writes the last q slots instead).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from xbm_jax.embeddings import Embeddings, check, valid_mask


class MemoryState(NamedTuple):
  """The memory; also a labeled set that every loss accepts as a reference.

  Attributes:
    emb: `[size, dim]` stored embeddings (float32 by default, bf16 to halve it).
    labels: `[size]` int32 labels of the stored embeddings.
    valid: `[size]` bool, True for slots that have been written.
    ptr: `[]` int32, the slot the next enqueue writes first.
    ids: optional `[size]` int32 image ids of the stored entries (-1: none), kept
      when the memory is made with `init(..., ids=True)`, for `self_exclusion="id"`.
      None otherwise (no leaf: such a memory's pytree is the four arrays above).
  """

  emb: jax.Array
  labels: jax.Array
  valid: jax.Array
  ptr: jax.Array
  ids: Optional[jax.Array] = None


def init(*, size: int, dim: int, dtype=jnp.float32, ids: bool = False) -> MemoryState:
  """An empty memory of `size` slots of `dim` features (and their image ids if `ids`)."""
  size, dim = int(size), int(dim)
  if size <= 0 or dim <= 0:
    raise ValueError(f"memory size and dim must be positive; got size={size}, dim={dim}")
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise TypeError(f"memory dtype must be floating; got {dtype}")
  return MemoryState(
    emb=jnp.zeros((size, dim), dtype),
    labels=jnp.zeros((size,), jnp.int32),
    valid=jnp.zeros((size,), jnp.bool_),
    ptr=jnp.zeros((), jnp.int32),
    ids=jnp.full((size,), -1, jnp.int32) if ids else None,
  )


def size(mem: MemoryState) -> int:
  return mem.emb.shape[0]


def enqueue(mem: MemoryState, batch: Embeddings, *, when=True, mask=None) -> MemoryState:
  """Writes the rows of `batch` into the next slots (mod size), oldest first out.

  The stored vectors are `stop_gradient`ed and cast to the memory's dtype.
  Every row is written (the pointer advances by B) unless `mask` selects
  some: then only those rows are written, in order, into consecutive slots,
  and the pointer advances by their number (a true ring: the oldest entries
  are the ones overwritten). Rows marked invalid in `batch.valid` but
  selected still take their slot, stored as invalid; pass `mask=batch.valid`
  to skip padding instead.

  Args:
    mem: the memory.
    batch: `Embeddings` with emb `[B, dim]`, labels `[B]`, optional valid `[B]`.
    when: optional traced `[]` bool; where False the memory is returned
      unchanged, in the same compiled program (no recompilation at a start
      step). Costs O(B * dim), not a copy of the memory.
    mask: optional `[B]` bool (may be traced): the rows to write.
  Returns:
    The new memory. Raises ValueError at trace time if B > size, dims differ or
    the mask is not `[B]` bool.
  """
  check(batch, "batch")
  k, d = mem.emb.shape
  b, bd = batch.emb.shape
  if bd != d:
    raise ValueError(f"batch dim {bd} does not match memory dim {d}")
  if b > k:
    raise ValueError(
      f"batch of {b} is larger than the memory of {k} slots; "
      "use a memory at least as large as the (global) batch"
    )
  if mem.ids is not None and batch.ids is None:
    raise ValueError("this memory stores image ids (init(ids=True)): batch.ids must be given")
  slots = next_slots(mem, b, when=when, mask=mask)
  # Rows not written go to distinct out-of-range slots (the scatter's indices
  # stay unique), which the scatter drops.
  slots = jnp.where(slots >= 0, slots, k + jnp.arange(b, dtype=jnp.int32))
  emb = jax.lax.stop_gradient(batch.emb).astype(mem.emb.dtype)
  put = lambda arr, val: arr.at[slots].set(val, mode="drop", unique_indices=True)
  return MemoryState(
    emb=put(mem.emb, emb),
    labels=put(mem.labels, batch.labels.astype(jnp.int32)),
    valid=put(mem.valid, valid_mask(batch)),
    ptr=((mem.ptr + jnp.sum(slots < k, dtype=jnp.int32)) % k).astype(jnp.int32),
    ids=None if mem.ids is None else put(mem.ids, batch.ids.astype(jnp.int32)),
  )


def check_mask(mask, rows: int, name: str = "mask") -> jax.Array:
  """`mask` as a `[rows]` bool array; a clear error naming `name` otherwise."""
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"{name} must be a bool array; got dtype {mask.dtype}")
  if mask.shape != (rows,):
    raise ValueError(f"{name} must be [{rows}] (one flag per row); got shape {tuple(mask.shape)}")
  return mask


def next_slots(mem: MemoryState, batch_size: int, *, when=True, mask=None) -> jax.Array:
  """`[batch_size]` int32 slots the next `enqueue(mem, ..., when=when, mask=mask)`
  of that many rows writes, row by row; -1 for rows it does not write.

  Read it from the memory *before* the enqueue (`last_slots` reads it after,
  without a mask); pass them as `self_index=` to exclude each anchor's own slot.
  """
  k = size(mem)
  write = jnp.ones((batch_size,), jnp.bool_) if mask is None else check_mask(mask, batch_size)
  write = write & jnp.asarray(when, jnp.bool_)
  rank = jnp.cumsum(write, dtype=jnp.int32) - 1
  return jnp.where(write, (mem.ptr + rank) % k, -1).astype(jnp.int32)


def last_slots(mem: MemoryState, batch_size: int) -> jax.Array:
  """`[batch_size]` int32 slots written by the latest enqueue of that many rows
  (all of them: no mask).

  Pass them as `self_index=` to a loss to exclude each anchor's own slot
  exactly (instead of the reference's similarity rule).
  """
  k = size(mem)
  return ((mem.ptr - batch_size + jnp.arange(batch_size, dtype=jnp.int32)) % k).astype(jnp.int32)


def fill(mem: MemoryState) -> jax.Array:
  """`[]` float32 fraction of slots holding an embedding."""
  return jnp.mean(mem.valid.astype(jnp.float32))


def active(step, start_step):
  """Whether the memory is used (enqueue and memory term) in the update `step`.

  The one start rule of the project. `step` is the 0-based index of the update
  about to run (`TrainState.step` before it); `start_step` is config.xbm.start_step.
  The reference increments its 1-based `iteration` and then tests
  `iteration > START_ITERATION`, i.e. `step + 1 > start_step`: with start 1000
  the memory is first used at update 1001, whose 0-based index is 1000.
  Works on Python ints (host controllers) and traced `[]` int arrays (the step).
  """
  return step >= start_step
