"""The cross-batch memory: a ring of past embeddings (`ring`), whole or split over devices.

    mem = xbm_jax.memory.init(size=55_000, dim=128)      # the ring's functions, re-exported
    mem = xbm_jax.memory.enqueue(mem, batch)
    mem = xbm_jax.memory.sharded.init(size=..., dim=..., mesh=mesh)  # one slice per device

`ring` holds the state (`MemoryState`) and its pure updates; `sharded` lays the same state
out over a mesh axis (shard-major rows) for memories larger than one device holds.
"""

from xbm_jax.memory.ring import (
  MemoryState,
  active,
  check_mask,
  enqueue,
  fill,
  init,
  last_slots,
  next_slots,
  size,
)
from xbm_jax.memory import ring, sharded

__all__ = [
  "MemoryState",
  "active",
  "check_mask",
  "enqueue",
  "fill",
  "init",
  "last_slots",
  "next_slots",
  "ring",
  "sharded",
  "size",
]
