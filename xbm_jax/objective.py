"""XBM's objective in one call: enqueue, then L(Q, B) + w * L(Q, M).

The same call serves one device and a data-parallel `jax.shard_map` step:

    def step(params, mem, images, labels):          # per device, under shard_map
      def objective(params):
        local = Embeddings(embed(params, images), labels)
        batch = Embeddings(all_gather(local.emb), all_gather(labels))   # "data"
        total, new_mem, aux = xbm_total_loss(local, batch, mem, step=t, start_step=s)
        return total, new_mem
      ...
      return pmean(grads), new_mem                   # out_specs P() for the memory

The data axes are read from the anchors' type (the mesh axes `local` varies
over; or pass `data_axis=`): the replicated memory then receives the batch
gathered as the same rows on every device, so shard_map's replication check
accepts `out_specs=P()` for it, and both terms normalise over the whole batch,
so the `pmean` of the loss is the one-device loss (for "paper" and "mean").
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from xbm_jax import memory as memory_lib
from xbm_jax.losses import builtin as losses, pairs
from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.embeddings import Embeddings, valid_mask

AxisNames = Union[None, str, tuple]


def varying_axes(x) -> tuple:
  """The mesh axes a value varies over inside shard_map (its type says), sorted;
  () outside shard_map or with replication checks off."""
  mat = getattr(jax.typeof(x), "mat", None)
  return tuple(sorted(getattr(mat, "varying", ()) or ()))


def _axes(data_axis: AxisNames) -> tuple:
  if data_axis is None:
    return ()
  return (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)


def _gather(x, axes: tuple, **kw):
  return jax.lax.all_gather(x, axes if len(axes) > 1 else axes[0], tiled=True, **kw)


def _enqueue(mem, query, batch, data, axis_name, active, enqueue_mask, query_offset):
  """(new memory, [Bq] slots written for the anchors' own rows or None)."""
  b, n_batch = query.emb.shape[0], batch.emb.shape[0]
  mask = enqueue_mask
  if mask is not None:
    mask = jnp.asarray(mask)
    rows = mask.shape[0] if mask.ndim == 1 else None
    if rows not in (b, n_batch):
      raise ValueError(
        f"enqueue_mask must be [{b}] (one flag per query row) or [{n_batch}] (per batch "
        f"row); got shape {tuple(mask.shape)}"
      )
    memory_lib.check_mask(mask, rows, "enqueue_mask")
  own = _own_rows(b, n_batch, data, query_offset)
  if axis_name is not None or (data and not set(data) & set(varying_axes(mem.emb))):
    # The memory is fed from the anchors: a shard takes its own device's rows; a
    # replicated memory the batch gathered as the SAME rows on every device
    # ("invarying": shard_map can then verify the memory stays replicated).
    if mask is not None and mask.shape[0] != b:  # per batch row: this device's rows
      if own is None:
        raise ValueError("a [B] enqueue_mask (per batch row) needs query_offset here")
      mask = jax.lax.dynamic_slice_in_dim(mask, own[0], b)
    if axis_name is not None:
      slots = sharded_memory.local_next_slots(mem, b, axis_name=axis_name, when=active, mask=mask)
      return sharded_memory.enqueue_local(mem, query, when=active, mask=mask), slots
    source = Embeddings(
      _gather(jax.lax.stop_gradient(query.emb), data, to="invarying"),
      _gather(query.labels, data, to="invarying"),
      _gather(valid_mask(query), data, to="invarying"),
      None if query.ids is None else _gather(query.ids, data, to="invarying"),
    )
    mask = None if mask is None else _gather(mask, data, to="invarying")
  else:
    source = batch
    if mask is not None and mask.shape[0] != n_batch:
      raise ValueError(f"enqueue_mask must be [{n_batch}], one flag per row of batch")
  slots = memory_lib.next_slots(mem, source.emb.shape[0], when=active, mask=mask)
  new = memory_lib.enqueue(mem, source, when=active, mask=mask)
  return new, (None if own is None else slots[own])


def _own_rows(b, n_batch, data, query_offset=None):
  """`[b]` rows of the anchors in the (gathered) batch, or None if unknown."""
  if query_offset is None:
    if data:
      query_offset = jax.lax.axis_index(data if len(data) > 1 else data[0]) * b
    elif b == n_batch:
      query_offset = 0
    else:
      return None
  return query_offset + jnp.arange(b, dtype=jnp.int32)


def _call(loss_fn, query, reference, kwargs, extra):
  """(value, stats) of a pair loss with `extra` (library options), or of a plain
  `f(query, reference, **kwargs)` (no stats)."""
  if pairs.is_pair_loss(loss_fn):
    return loss_fn(query, reference, return_stats=True, **extra, **kwargs)
  return loss_fn(query, reference, **kwargs), {}


def _memory_term(active, loss_fn, query, mem, kwargs, extra):
  """`_call` on the memory where `active`, else zeros: under `lax.cond` the compiled
  step skips the memory's products before the start and while a guard holds the
  memory off (one compiled step still serves the whole run)."""
  # Inside shard_map both branches must agree on what varies over which mesh axis:
  # both return values varying over every axis the anchors or the memory vary over.
  target = set(varying_axes(query.emb)) | set(varying_axes(mem.emb))

  def to_target(x):
    missing = tuple(sorted(target - set(varying_axes(x))))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  def term():
    return jax.tree.map(to_target, _call(loss_fn, query, mem, kwargs, extra))

  def zeros():
    shapes = jax.eval_shape(term)
    return jax.tree.map(lambda s: to_target(jnp.zeros(s.shape, s.dtype)), shapes)

  return jax.lax.cond(active, term, zeros)


def xbm_total_loss(
  query,
  batch,
  mem,
  *,
  step,
  start_step,
  weight=1.0,
  loss: Union[str, Callable] = "contrastive",
  axis_name: Optional[str] = None,
  data_axis: AxisNames = None,
  enqueue: bool = True,
  enqueue_mask=None,
  batch_self_index=None,
  memory_self_index=None,
  query_offset=None,
  memory_loss_kwargs: Optional[dict] = None,
  denominators: Optional[dict] = None,
  **loss_kwargs,
):
  """XBM's objective for one step: enqueue first, then L(Q, B) + w * L(Q, M).

  Where `memory.active(step, start_step)` (the one start rule; both may be
  traced) the detached batch is enqueued into `mem` before the losses, so the
  memory term also sees the current batch, as in the reference. Before it, the
  memory is left untouched and its term is not computed (`lax.cond`; zero value and
  statistics), so one compiled step serves the whole run.

  Args:
    query: anchors (the local batch under data parallelism), `[Bq, D]`.
    batch: the (gathered, global) batch `[B, D]`; the in-batch term sends
      gradient to both sides.
    mem: a `MemoryState` (whole on every device), or with `axis_name` this
      device's shard of a memory split over that mesh axis
      (`xbm_jax.memory.sharded`; call inside shard_map): each device then
      enqueues its own `query` into its own shard.
    step, start_step: ints or `[]` int arrays. weight: float or `[]` array.
    loss: a name of `LOSSES`, an import path "pkg.module:function", or a
      function: a pair loss (`xbm_jax.losses.pairs.pair_loss` / `reduction_loss`,
      which gets every option below, the sharded memory included) or a plain
      `f(query, reference, **loss_kwargs) -> []` (replicated memory only; no
      statistics; its own reduction).
    data_axis: the mesh axis (or tuple) the anchors are split over; default:
      the axes `query` varies over inside shard_map (none outside it). With
      one, a replicated memory receives the whole batch as the same rows on
      every device (replication is verifiable), and both terms normalise
      over the whole batch (see `xbm_jax.losses`, `data_axis`).
    enqueue: False if the caller enqueued already.
    enqueue_mask: optional `[Bq]` (per query row) or `[B]` (per batch row) bool:
      only those rows enter the memory, in order (see `memory.enqueue`).
    batch_self_index / memory_self_index: `self_index` for each term when
      `self_exclusion="index"`; defaults: the anchors' rows in `batch` and
      their slots in this enqueue (-1 where not enqueued), known when `query`
      is the whole batch, under data parallelism, or when `query_offset` (its
      first row in `batch`) is given.
    memory_loss_kwargs: overrides of `loss_kwargs` for the memory term only,
      e.g. `{"reduction": "mean"}` to average it over its active pairs.
    denominators: optional `{"batch": [], "xbm": []}` counts each term divides
      by instead of its own (the `denominator` option of the losses).
  Returns:
    `(loss, new_mem, aux)` with aux = {"loss_batch", "loss_xbm", "xbm_weight",
    "batch/<stat>", "xbm/<stat>"}.
  """
  mem_kwargs = {**loss_kwargs, **(memory_loss_kwargs or {})}
  loss_fn = losses.check_loss_options(loss, set(loss_kwargs) | set(mem_kwargs))
  is_pair = pairs.is_pair_loss(loss_fn)
  if axis_name is not None and not is_pair:
    raise TypeError(
      f"loss {getattr(loss_fn, '__name__', loss_fn)} is a plain function: a sharded memory "
      "(axis_name) needs a pair loss (xbm_jax.losses.pairs.pair_loss or reduction_loss)"
    )
  data = _axes(data_axis) if data_axis is not None else varying_axes(query.emb)
  active = memory_lib.active(jnp.asarray(step), jnp.asarray(start_step))
  b, n_batch = query.emb.shape[0], batch.emb.shape[0]
  own_slots = None
  if enqueue:
    mem, own_slots = _enqueue(
      mem, query, batch, data, axis_name, active, enqueue_mask, query_offset
    )
  elif enqueue_mask is not None:
    raise ValueError("enqueue_mask needs enqueue=True")
  own_rows = _own_rows(b, n_batch, data, query_offset)
  bound = losses.bound_options(loss_fn)  # a bound loss carries its own options
  if {**bound, **loss_kwargs}.get("self_exclusion") == "index" and batch_self_index is None:
    batch_self_index = own_rows
  own_mem = {**bound, **mem_kwargs}.get("self_exclusion")
  if own_mem == "index" and memory_self_index is None:
    if own_slots is None and own_rows is not None:  # enqueued by the caller: all rows
      if axis_name is not None:
        own_slots = sharded_memory.local_last_slots(mem, b, axis_name=axis_name)
      else:
        own_slots = memory_lib.last_slots(mem, n_batch)[own_rows]
    memory_self_index = own_slots
  denominators = denominators or {}
  data_axis = (data if len(data) > 1 else data[0]) if data else None
  extra_b = dict(self_index=batch_self_index, data_axis=data_axis)
  extra_m = dict(self_index=memory_self_index, data_axis=data_axis, axis_name=axis_name)
  loss_b, stats_b = _call(
    loss_fn, query, batch, loss_kwargs, {**extra_b, "denominator": denominators.get("batch")}
  )
  loss_m, stats_m = _memory_term(
    active, loss_fn, query, mem, mem_kwargs, {**extra_m, "denominator": denominators.get("xbm")}
  )
  total, aux = combine_terms(loss_b, stats_b, loss_m, stats_m, active=active, weight=weight)
  return total, mem, aux


def combine_terms(loss_b, stats_b, loss_m, stats_m, *, active, weight):
  """`(L_B + w * L_M, aux)` with w = weight where `active`, else 0 (traced)."""
  w = jnp.where(active, jnp.asarray(weight, jnp.float32), 0.0)
  aux = {"loss_batch": loss_b, "loss_xbm": loss_m, "xbm_weight": w}
  aux.update({f"batch/{k}": v for k, v in stats_b.items()})
  aux.update({f"xbm/{k}": v for k, v in stats_m.items()})
  return loss_b + w * loss_m, aux
