"""XBM as one value with its settings bound once, in optax's style: `init()`, `update()`.

    xbm = CrossBatchMemory(size=55_000, dim=128, start_step=1000,
                           loss=losses.bind(losses.multi_similarity, beta=40.0))
    mem = xbm.init()                                     # a MemoryState, in your train state
    loss, mem, aux = xbm.update(query, batch, mem, step=step)   # under jit / shard_map

`update` is `objective.xbm_total_loss` with these settings: enqueue the batch (from
`start_step` on), then `L(Q, B) + weight * L(Q, M)`. The settings are checked when the
object is made (a bad loss option, size or dtype is one error there, not at trace time).
Only data is passed per call; `weight` / `start_step` may be overridden per call by traced
values (a host-side controller's gates), which is how the trainer drives its schedule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

import jax.numpy as jnp

from xbm_jax import memory as memory_lib
from xbm_jax.losses import builtin as losses, pairs
from xbm_jax.objective import xbm_total_loss


@dataclasses.dataclass(frozen=True)
class CrossBatchMemory:
  """The settings of a cross-batch memory and its loss.

  Attributes:
    size: rows the memory holds (`K`); `dim`: the embedding width (`D`).
    loss: a pair loss, its name, an import path, or a bound one (`losses.bind`,
      `functools.partial`); used for both terms.
    weight: `w` of the memory term.
    start_step: the first step that enqueues and scores the memory.
    memory_options: overrides of the loss's options for the memory term only, e.g.
      `{"reduction": "mean"}` or `{"self_exclusion": "id"}` (needs `ids=True`).
    dtype: the stored rows' dtype (e.g. `jnp.bfloat16`).
    ids: also store image ids (for `self_exclusion="id"`).
    axis_name: None (a replicated memory), or the mesh axis the memory's rows are split
      over (a sharded memory; `init` then needs `n_shards` or `mesh`).
    data_axis: the mesh axis the anchors are split over (None: read from their type).
  """

  size: int
  dim: int
  loss: Union[str, Callable] = "contrastive"
  weight: float = 1.0
  start_step: int = 0
  memory_options: Optional[dict] = None
  dtype: object = jnp.float32
  ids: bool = False
  axis_name: Optional[str] = None
  data_axis: object = None

  def __post_init__(self):
    for name in ("size", "dim", "start_step"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "start_step" else 1):
        low = "an int >= 0" if name == "start_step" else "a positive int"
        raise ValueError(f"CrossBatchMemory: {name} must be {low}; got {v!r}")
    if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
      raise ValueError(f"CrossBatchMemory: weight must be a finite number; got {self.weight!r}")
    if not jnp.issubdtype(self.dtype, jnp.floating):
      raise ValueError(f"CrossBatchMemory: dtype must be a float dtype; got {self.dtype!r}")
    fn = losses.check_loss_options(self.loss, set(self.memory_options or {}))
    if self.axis_name is not None and not pairs.is_pair_loss(fn):
      raise TypeError(
        f"CrossBatchMemory: loss {getattr(fn, '__name__', fn)} is a plain function; a "
        "sharded memory (axis_name) needs a pair loss (pairs.pair_loss / reduction_loss)"
      )
    object.__setattr__(self, "loss", fn)
    object.__setattr__(self, "memory_options", dict(self.memory_options or {}))
    if self.memory_term_options.get("self_exclusion") == "id" and not self.ids:
      raise ValueError('CrossBatchMemory: the memory term\'s self_exclusion="id" needs ids=True')

  @property
  def loss_options(self) -> dict:
    """The options bound into `loss` (both terms), e.g. `{"margin": 0.5}`."""
    return losses.bound_options(self.loss)

  @property
  def memory_term_options(self) -> dict:
    """The options the memory term runs with: the loss's, then `memory_options`."""
    return {**self.loss_options, **self.memory_options}

  def init(self, *, n_shards: Optional[int] = None, mesh=None) -> memory_lib.MemoryState:
    """An empty memory: `emb [K, D]`, `labels [K]`, `valid [K]`, `ptr` (and `ids [K]`).

    Sharded (`axis_name` set): the global arrays, split over `n_shards` devices
    (default: the mesh's `axis_name` size) and placed on `mesh` when given."""
    if self.axis_name is None:
      if n_shards is not None or mesh is not None:
        raise ValueError("CrossBatchMemory.init: n_shards / mesh need axis_name (a sharded memory)")
      return memory_lib.init(size=self.size, dim=self.dim, dtype=self.dtype, ids=self.ids)
    if n_shards is None:
      if mesh is None:
        raise ValueError("CrossBatchMemory.init: a sharded memory needs n_shards or mesh")
      n_shards = mesh.shape[self.axis_name]
    return memory_lib.sharded.init(
      size=self.size, dim=self.dim, n_shards=n_shards, dtype=self.dtype, mesh=mesh,
      axis_name=self.axis_name, ids=self.ids,
    )  # fmt: skip

  def update(
    self,
    query,
    batch,
    mem,
    *,
    step,
    enqueue_mask=None,
    weight=None,
    start_step=None,
    **low_level,
  ):
    """Enqueue `batch` into `mem` (from `start_step` on), then the loss.

    Args:
      query: the anchors `[Bq, D]` (the local batch under data parallelism).
      batch: the whole (gathered) batch `[B, D]`, enqueued and the in-batch reference.
      mem: the memory before this batch (this device's slice when sharded).
      step: the current step (may be traced).
      enqueue_mask: `[Bq]` or `[B]` bool, rows to enqueue (None: all).
      weight, start_step: per-call overrides of the bound settings (may be traced).
      **low_level: the rest of `xbm_total_loss`'s keywords (e.g. `denominators`,
        `enqueue=False` when the caller enqueued other rows itself).
    Returns:
      `(loss [], new memory, aux)` as `xbm_total_loss`.
    """
    return xbm_total_loss(
      query,
      batch,
      mem,
      step=step,
      start_step=self.start_step if start_step is None else start_step,
      weight=self.weight if weight is None else weight,
      loss=self.loss,
      axis_name=self.axis_name,
      data_axis=self.data_axis,
      enqueue_mask=enqueue_mask,
      memory_loss_kwargs=self.memory_options or None,
      **low_level,
    )
