"""Anchors scored against a reference set, and the two ways to write a pair loss on it.

A pair loss here is a function of the `[B, R]` cosine-similarity matrix of the
anchors (`query`) against a reference set (the batch, or the memory) and of
two boolean masks, `pos` (same label, both valid, minus the anchor's own
entry) and `neg` (different label, both valid). Write it once, in either form,
and the library gives it the whole calling convention of the built-in losses:
the in-batch term, a replicated memory and a memory sharded over devices
(exact: same value and gradient as one device), the self rules, the
reductions and the statistics.

1. Per anchor, on one row (the simplest):

       @xbm_jax.losses.pairs.pair_loss
       def my_loss(sim, pos, neg, *, margin=0.5):   # [R] f32, [R] bool, [R] bool
         return jnp.sum(jnp.where(pos, 1 - sim, 0) + jnp.where(neg & (sim > margin), sim, 0))

   It may return a scalar, or `(loss, active)` with `active` the anchor's
   number of active pairs (`reduction="mean"` needs it). Against a sharded
   memory each device first receives its anchors' whole rows (an all_to_all
   of `[b, R]` floats per device), so it is exact for any function.

2. On all rows at once, with reductions that complete across shards (for a
   sharded memory without moving rows):

       @xbm_jax.losses.pairs.reduction_loss
       def my_loss(rows, *, margin=0.5):             # rows: a `Rows`
         neg = rows.neg & (jax.lax.stop_gradient(rows.sim) > margin)
         loss = rows.sum(1 - rows.sim, rows.pos) + rows.sum(rows.sim, neg)   # [G]
         return loss, rows.count(rows.pos) + rows.count(neg)

   `Rows.sum / count / min / max / log1p_sum_exp` return one value per anchor
   row `[G]`, complete over the whole reference (psum / pmin / pmax across
   shards, the gradient routed to the winning entries). `rows.whole()` gives
   the per-row form's whole rows. The built-in losses (`xbm_jax.losses`) are
   written this way.

Both decorators return `loss(query, reference, *, pos_threshold=None,
self_exclusion="similarity", self_index=None, reduction="paper",
return_stats=False, axis_name=None, data_axis=None, **options)`; the options
are the decorated function's keyword parameters, checked at trace time.
See `xbm_jax.losses` for the common options.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from xbm_jax.losses.scoring import (  # noqa: F401  (re-exported: the names a pair loss is written with)
  EPS_SELF,
  EPS_SELF_16BIT,
  REDUCTIONS,
  SELF_EXCLUSIONS,
  Prepared,
  Rows,
  check_ids,
  check_self_index,
  pair_masks,
  prepare,
  score,
  self_threshold,
  similarity,
)

sg = jax.lax.stop_gradient


class AnchorLoss(NamedTuple):
  """What a `reduction_loss` function may return (a plain `[G]` array or a
  `(loss, active)` tuple are accepted too).

  loss: `[G]` per-anchor loss (or `[b]` when `rows` is a `whole()` view).
  active: per-anchor count of active pairs (the denominator of "mean").
  pos_active, neg_active: `[G, R]` bool pairs counted in the statistics
    (default: all positives / negatives).
  rows: the `Rows` these arrays belong to (default: the ones passed in).
  """

  loss: jax.Array
  active: Optional[jax.Array] = None
  pos_active: Optional[jax.Array] = None
  neg_active: Optional[jax.Array] = None
  rows: Optional[Rows] = None


def _as_anchor_loss(out, rows: Rows, name: str) -> AnchorLoss:
  if isinstance(out, AnchorLoss):
    pass
  elif isinstance(out, tuple) and len(out) == 2:
    out = AnchorLoss(*out)
  elif isinstance(out, jax.Array) or hasattr(out, "shape"):
    out = AnchorLoss(out)
  else:
    raise TypeError(
      f"pair loss {name} must return a [G] per-anchor loss, a (loss, active) pair "
      f"or an AnchorLoss; got {type(out).__name__}"
    )
  own = out.rows if out.rows is not None else rows
  n = own.sim.shape[0]
  if jnp.shape(out.loss) != (n,):
    raise ValueError(
      f"pair loss {name} returned a loss of shape {jnp.shape(out.loss)}; "
      f"expected one value per anchor row, [{n}]"
    )
  return out._replace(rows=own)


def _reduce(out: AnchorLoss, reduction, data_axis, denominator, name):
  """(loss, denominator) of an `AnchorLoss` (see `reduce_anchors`)."""
  rows = out.rows
  if reduction == "mean" and out.active is None and denominator is None:
    raise ValueError(
      f"reduction='mean' needs pair loss {name} to return its per-anchor "
      "active pair counts: (loss, active)"
    )
  active = None if out.active is None else rows.own(out.active)
  return reduce_anchors(
    rows.own(out.loss), active, rows.local_valid, reduction, data_axis, denominator
  )


def reduce_anchors(per, active, local_valid, reduction, data_axis, denominator):
  """(loss, denominator): the sum of this device's anchors' losses `per [b]` over
  the count of valid anchors ("paper") or of active pairs ("mean", `active [b]`),
  counted over all of `data_axis`, unless `denominator` is given."""
  per = jnp.where(local_valid, per, 0.0)
  if denominator is None:
    if reduction == "paper":
      denominator = jnp.sum(local_valid)
    else:
      denominator = jnp.sum(jnp.where(local_valid, active, 0))
    if data_axis is not None:
      denominator = jax.lax.psum(denominator, data_axis)
  denominator = jnp.asarray(denominator, jnp.float32)
  # Under data parallelism each device's share is scaled so that the mean over
  # the axis (pmean, as for the gradients) is the whole batch's loss.
  share = 1.0 if data_axis is None else jax.lax.axis_size(data_axis)
  return jnp.sum(per) * share / jnp.maximum(denominator, 1.0), denominator


def _stats(rows: Rows, pos_active, neg_active, denominator) -> dict:
  s = sg(rows.sim)
  counts, means = {}, {}
  for kind, mask in (("pos", pos_active), ("neg", neg_active)):
    n = jnp.sum(rows.own(rows.count(mask)))
    counts[f"{kind}_pairs"] = n.astype(jnp.int32)
    means[f"mean_{kind}_sim"] = jnp.sum(rows.own(rows.sum(s, mask))) / jnp.maximum(n, 1)
  return {**counts, **means, "denominator": denominator}


# The keyword options every pair loss takes (handled here, never by the loss itself).
COMMON_OPTIONS = {
  "pos_threshold": None,
  "self_exclusion": "similarity",
  "self_index": None,
  "reduction": "paper",
  "return_stats": False,
  "axis_name": None,
  "data_axis": None,
  "denominator": None,
}


def _loss_options(fn: Callable, n_arrays: int, form: str) -> dict:
  """`{name: default}` of fn's keyword options after its `n_arrays` positional
  inputs; a clear TypeError for any other shape of signature."""
  params = list(inspect.signature(fn).parameters.values())
  positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
  name = getattr(fn, "__name__", repr(fn))
  head = [p for p in params[:n_arrays] if p.kind in positional and p.default is p.empty]
  rest = params[len(head) :]
  bad = [
    p.name
    for p in rest
    if p.kind == p.VAR_POSITIONAL or (p.kind in positional and p.default is p.empty)
  ]
  if len(head) != n_arrays or bad:
    want = {1: "(rows, *, options...)", 3: "(sim, pos, neg, *, options...)"}[n_arrays]
    got = ", ".join(p.name for p in params)
    raise TypeError(f"{form}: {name} must have the signature {want}; got ({got})")
  options = {p.name: p.default for p in rest if p.kind != p.VAR_KEYWORD}
  clash = sorted(set(options) & set(COMMON_OPTIONS))
  if clash:
    raise TypeError(f"{form}: {name} may not define the library's own options {clash}")
  return options


def check_options(name: str, given, options: dict) -> None:
  """A clear error for an option the loss `name` does not take."""
  unknown = sorted(set(given) - set(options) - set(COMMON_OPTIONS))
  if unknown:
    valid = sorted(set(options) | set(COMMON_OPTIONS))
    raise TypeError(f"loss {name} takes no option {unknown[0]!r}; its options: {valid}")


def _make_loss(
  per_rows: Callable, options: dict, name: str, doc: Optional[str], fast: Optional[Callable] = None
) -> Callable:
  """The full calling convention around `per_rows(rows, **options) -> AnchorLoss`.

  `fast(query, reference, *, axis_name, self_exclusion, pos_threshold, self_index,
  **options)`, where given, may instead return `(per [b], active [b], local_valid
  [b], stats)` with the same values (or None to use `per_rows`)."""

  def loss(
    query,
    reference,
    *,
    pos_threshold=None,
    self_exclusion="similarity",
    self_index=None,
    reduction="paper",
    return_stats=False,
    axis_name=None,
    data_axis=None,
    denominator=None,
    **kwargs,
  ):
    check_options(name, kwargs, options)
    if reduction not in REDUCTIONS:
      raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    common = dict(
      axis_name=axis_name,
      self_exclusion=self_exclusion,
      pos_threshold=pos_threshold,
      self_index=self_index,
    )
    quick = None if fast is None else fast(query, reference, **common, **kwargs)
    if quick is not None:
      per, active, local_valid, stats = quick
      value, denom = reduce_anchors(per, active, local_valid, reduction, data_axis, denominator)
      return (value, {**stats, "denominator": denom}) if return_stats else value
    rows = score(query, reference, **common)
    out = _as_anchor_loss(per_rows(rows, **kwargs), rows, name)
    value, denom = _reduce(out, reduction, data_axis, denominator, name)
    if not return_stats:
      return value
    pos = out.rows.pos if out.pos_active is None else out.pos_active
    neg = out.rows.neg if out.neg_active is None else out.neg_active
    return value, _stats(out.rows, pos, neg, denom)

  kw = inspect.Parameter.KEYWORD_ONLY
  arrays = [
    inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("query", "reference")
  ]
  opts = {**COMMON_OPTIONS, **options}
  loss.__signature__ = inspect.Signature(
    arrays + [inspect.Parameter(k, kw, default=v) for k, v in opts.items()]
  )
  loss.__name__ = loss.__qualname__ = name
  loss.__doc__ = doc
  loss.options = dict(options)  # the loss's own options and their defaults
  loss.is_pair_loss = True
  return loss


def reduction_loss(fn: Callable, *, fast: Optional[Callable] = None) -> Callable:
  """A pair loss from `fn(rows: Rows, **options)` -> `[G]` per-anchor losses, a
  `(loss, active)` pair or an `AnchorLoss` (see the module doc). `fast`: an
  optional one-pass implementation of the same loss (see `_make_loss`)."""
  options = _loss_options(fn, 1, "reduction_loss")
  loss = _make_loss(fn, options, fn.__name__, fn.__doc__, fast)
  loss.__module__ = fn.__module__
  return loss


def pair_loss(row_fn: Callable) -> Callable:
  """A pair loss from a per-anchor `row_fn(sim [R] f32, pos [R] bool, neg [R] bool,
  **options)` -> `[]` loss, or `([]` loss, `[]` active pair count) (see the module
  doc). Each anchor's row is the whole reference; padding anchors count 0."""
  options = _loss_options(row_fn, 3, "pair_loss")
  name = getattr(row_fn, "__name__", "pair_loss")

  def per_rows(rows: Rows, **kwargs) -> AnchorLoss:
    whole = rows.whole()
    out = jax.vmap(lambda s, p, n: row_fn(s, p, n, **kwargs))(whole.sim, whole.pos, whole.neg)
    loss, active = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
    if jnp.ndim(loss) != 1:
      raise ValueError(
        f"pair loss {name} must return a scalar per anchor row; got {jnp.shape(loss)[1:]}"
      )
    return AnchorLoss(loss, active, rows=whole)

  loss = _make_loss(per_rows, options, name, row_fn.__doc__)
  loss.__module__ = getattr(row_fn, "__module__", loss.__module__)
  return loss


def is_pair_loss(fn) -> bool:
  """Whether fn has the library's calling convention (built by these decorators)."""
  return getattr(fn, "is_pair_loss", False) is True


def bind(loss: Callable, **options) -> Callable:
  """The pair loss `loss` with some of its options fixed: a configured loss as a value.

  The result is still a pair loss: it returns statistics, runs against a sharded memory,
  takes every library option, and a call may still override a bound option. (A
  `functools.partial` of a pair loss is turned into this by `losses.resolve`.)

      ms = bind(losses.multi_similarity, beta=40.0, margin=0.5)
      ms(batch, mem, return_stats=True)
  """
  if not is_pair_loss(loss):
    raise TypeError(f"bind: {getattr(loss, '__name__', loss)!r} is not a pair loss")
  check_options(loss.__name__, options, loss.options)
  bound_options = dict(options)

  def bound(query, reference, **kwargs):
    return loss(query, reference, **{**bound_options, **kwargs})

  sig = inspect.signature(loss)
  params = [p.replace(default=bound_options[p.name]) if p.name in bound_options else p
            for p in sig.parameters.values()]  # fmt: skip
  bound.__signature__ = sig.replace(parameters=params)
  bound.__name__ = bound.__qualname__ = loss.__name__
  bound.__doc__ = loss.__doc__
  bound.__module__ = loss.__module__
  bound.options = {k: bound_options.get(k, v) for k, v in loss.options.items()}
  bound.bound_options = {**getattr(loss, "bound_options", {}), **bound_options}
  bound.is_pair_loss = True
  return bound
