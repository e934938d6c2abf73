"""The train step on one device: `per_device(settings, state, rows, ctrl)`.

`step.make_train_step` checks its options into `StepSettings` and maps
`per_device` over the mesh with `jax.shard_map`; see its docstring for what each
option does. Every collective here names `DATA_AXIS`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from xbm_jax import memory as memory_lib
from xbm_jax.cross_batch import CrossBatchMemory
from xbm_jax.freshness import moments as drift_lib
from xbm_jax.freshness import momentum as momentum_lib
from xbm_jax.freshness import reprojection as reprojection_lib
from xbm_jax.memory import sharded as sharded_lib
from xbm_jax.embeddings import Embeddings
from xbm_jax.parallel import DATA_AXIS
from xbm_jax.train.state import TrainState
from xbm_jax.train.step_stats import all_finite, combine_stats, device_stats


class StepSettings(NamedTuple):
  """`make_train_step`'s options, checked (static: closed over by the jitted step)."""

  model: Any
  direction: optax.GradientTransformation
  schedule: Callable
  xbm: CrossBatchMemory  # the memory's settings and its (bound) loss
  accumulate: int
  drift_correction: str
  moments_ema: float
  momentum_encoder: float
  reprojection: bool
  memory_ids: bool  # the memory term excludes by image id: the memory stores ids
  image_ids: bool  # some term excludes by image id: the batch carries them
  count_first: bool  # "mean" over micro-batches: the step's active pairs counted first

  @property
  def sharded_memory(self) -> bool:
    """Each device holds a slice of the memory's rows (`xbm.axis_name` is set)."""
    return self.xbm.axis_name is not None


def corrected(s: StepSettings, memory, moments, emb, step, ctrl):
  """`(memory, moments)`: with drift correction, the memory moment-matched to this
  (micro-)batch where it is active, and the smoothed moments updated. Computed
  every step and selected (not under `lax.cond`, whose collectives, with a sharded
  memory, could deadlock against the step's on XLA:CPU): O(size * dim), no product."""
  if s.drift_correction == "none":
    return memory, moments
  valid = jnp.ones(emb.shape[:1], jnp.bool_)
  mean, var, _ = drift_lib.moments(jax.lax.stop_gradient(emb), valid, axis_name=DATA_AXIS)
  if moments is not None:
    moments = drift_lib.update(moments, mean, var, decay=s.moments_ema)
    mean, var = moments.mean, moments.var
  axis = DATA_AXIS if s.sharded_memory else None
  matched = drift_lib.match_moments(memory, mean, var, axis_name=axis)
  active = memory_lib.active(step, ctrl["start_step"])
  return memory._replace(emb=jnp.where(active, matched.emb, memory.emb)), moments


def key_embeddings(s: StepSettings, key_encoder, params, images):
  """`([b, D] this device's batch embedded by the momentum encoder, the encoder)`:
  its params moved toward `params` first, then its train-mode forward (which
  updates its own BatchNorm statistics). Every step, the memory on or off (under
  `lax.cond` the forward's collectives could deadlock against the step's on XLA:CPU,
  whose devices run independent collectives in their own order)."""
  key_encoder = momentum_lib.update(key_encoder, params, momentum=s.momentum_encoder)
  emb, new_vars = s.model.apply(
    momentum_lib.variables(key_encoder), images, train=True, mutable=["batch_stats"]
  )
  stats = new_vars.get("batch_stats", key_encoder.batch_stats)
  return jax.lax.stop_gradient(emb), key_encoder._replace(batch_stats=stats)


def enqueue_keys(s: StepSettings, memory, keys, labels, ids, step, ctrl):
  """The memory with this step's key embeddings enqueued where it is active (a
  shard takes its device's rows; a replicated memory the batch gathered alike on
  every device, so that it stays replicated)."""
  active = memory_lib.active(step, ctrl["start_step"])
  rows = Embeddings(keys, labels, ids=ids)
  if s.sharded_memory:
    return sharded_lib.enqueue_local(memory, rows, when=active)
  gather = lambda x: jax.lax.all_gather(x, DATA_AXIS, tiled=True, to="invarying")
  return memory_lib.enqueue(memory, jax.tree.map(gather, rows), when=active)


def embed_and_loss(
  s: StepSettings, params, batch_stats, carry, rows, step, ctrl, denominators, keys=None
):
  """(loss, ((memory, moments), BN statistics, aux)) of one (micro-)batch on this
  device; `carry` is `(memory, moments)`; `rows` its `(images, labels, ids or
  None)`; `keys`: the momentum encoder's embeddings of the batch, enqueued instead
  of the trained encoder's. With reprojection the memory (features) takes the
  batch's pooled features and the loss sees it through the current head."""
  images, labels, ids = rows
  variables = {"params": params, "batch_stats": batch_stats}
  if s.reprojection:
    (pooled, emb), new_vars = s.model.apply(
      variables, images, train=True, mutable=["batch_stats"], method="features_and_embeddings"
    )
    keys = pooled  # enqueued (detached) below, as the momentum encoder's keys are
  else:
    emb, new_vars = s.model.apply(variables, images, train=True, mutable=["batch_stats"])
  memory, moments = corrected(s, *carry, emb, step, ctrl)
  if keys is not None:
    memory = enqueue_keys(s, memory, keys, labels, ids, step, ctrl)
  reference = memory
  if s.reprojection:
    head = reprojection_lib.head_projection(s.model, params)
    reference = reprojection_lib.embeddings(memory, head, detach=True)
  local = Embeddings(emb, labels, ids=ids)
  glob = jax.tree.map(lambda x: jax.lax.all_gather(x, DATA_AXIS, tiled=True), local)
  total, mem, aux = s.xbm.update(
    local,
    glob,
    reference,
    step=step,
    start_step=ctrl["start_step"],  # the host-side controller's gates, traced
    weight=ctrl["xbm_weight"],
    denominators=denominators,
    enqueue=keys is None,
  )
  if s.reprojection:  # the state keeps the features; `mem` is their projection
    mem = memory
  return total, ((mem, moments), new_vars.get("batch_stats", batch_stats), aux)


def micro_step(
  s: StepSettings, state, batch_stats, carry, rows, ctrl, denominators=None, keys=None
):
  """Loss, gradients, BN statistics, (memory, moments) and statistics of one
  (micro-)batch `rows`."""
  objective = lambda p: embed_and_loss(
    s, p, batch_stats, carry, rows, state.step, ctrl, denominators, keys
  )
  # Differentiate at a "varying" copy of the replicated params: each device's
  # gradient of its own loss, reduced once by the pmean in per_device (at the
  # invariant params the transpose would psum every micro-batch's gradient).
  params = jax.lax.pcast(state.params, DATA_AXIS, to="varying")
  (loss, (carry, new_stats, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params)
  return loss, grads, new_stats, carry, aux


def split_micro(s: StepSettings, rows):
  """`rows` (each `[b, ...]` or None) as `accumulate` micro-batches `[N, b / N, ...]`."""
  if rows[1].shape[0] % s.accumulate:
    raise ValueError(
      f"the per-device batch {rows[1].shape[0]} does not divide into "
      f"accumulate={s.accumulate} micro-batches"
    )
  return jax.tree.map(lambda x: x.reshape((s.accumulate, -1) + x.shape[1:]), rows)


def step_denominators(s: StepSettings, state, rows, ctrl):
  """`{"batch", "xbm"}`: each term's count over the whole step (all micro-batches and
  devices, from a forward pass over them in turn) / accumulate, so that the mean
  of the micro-batches' losses is the whole step's numerator over its count."""

  def body(carry, xs):
    _, (carry, _, aux) = embed_and_loss(
      s, state.params, state.batch_stats, carry, xs, state.step, ctrl, None
    )
    return carry, (aux["batch/denominator"], aux["xbm/denominator"])

  carry = (state.memory, state.moments)
  _, (d_batch, d_xbm) = jax.lax.scan(body, carry, split_micro(s, rows))
  return {"batch": jnp.sum(d_batch) / s.accumulate, "xbm": jnp.sum(d_xbm) / s.accumulate}


def accumulated(s: StepSettings, state, rows, ctrl):
  """`accumulate` micro-batches in turn (see make_train_step), gradients averaged."""
  denominators = step_denominators(s, state, rows, ctrl) if s.count_first else None

  def body(carry, xs):
    grad_sum, batch_stats, mem_carry = carry
    loss, grads, batch_stats, mem_carry, aux = micro_step(
      s, state, batch_stats, mem_carry, xs, ctrl, denominators
    )
    grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
    return (grad_sum, batch_stats, mem_carry), (loss, aux)

  # Per-device gradients ("varying", see micro_step) until the pmean.
  zeros = jax.lax.pcast(jax.tree.map(jnp.zeros_like, state.params), DATA_AXIS, to="varying")
  start = (zeros, state.batch_stats, (state.memory, state.moments))
  (grad_sum, batch_stats, mem_carry), (loss, aux) = jax.lax.scan(body, start, split_micro(s, rows))
  grads = jax.tree.map(lambda g: g / s.accumulate, grad_sum)
  aux = combine_stats(aux, lambda x: jnp.sum(x, axis=0))
  return jnp.mean(loss), grads, batch_stats, mem_carry, aux


def per_device(s: StepSettings, state: TrainState, rows, ctrl):
  """`(new state, metrics)` of one step on this device: `rows` its `(images, labels,
  ids or None)`, gradients `pmean`ed over `DATA_AXIS`."""
  keys, key_encoder = None, state.key_encoder
  if s.momentum_encoder > 0:
    keys, key_encoder = key_embeddings(s, state.key_encoder, state.params, rows[0])
  if s.accumulate == 1:
    loss, grads, batch_stats, (mem, moments), aux = micro_step(
      s, state, state.batch_stats, (state.memory, state.moments), rows, ctrl, keys=keys
    )
  else:
    loss, grads, batch_stats, (mem, moments), aux = accumulated(s, state, rows, ctrl)
  grads = jax.lax.pmean(grads, DATA_AXIS)
  updates, opt_state = s.direction.update(grads, state.opt_state, state.params)
  lr = s.schedule(state.step) * ctrl["lr_scale"]
  # The plateau scale stays a traced multiplier fed with ctrl (not
  # optax.inject_hyperparams): it is host state, checkpointed with the Plateau,
  # and the opt_state (and so old checkpoints) keeps its structure.
  params = optax.apply_updates(state.params, jax.tree.map(lambda u: -lr * u, updates))
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    batch_stats=batch_stats,
    opt_state=opt_state,
    memory=mem,
    moments=moments,
    key_encoder=key_encoder,
  )
  return new_state, step_metrics(loss, grads, updates, new_state, lr, aux)


def step_metrics(loss, grads, updates, new_state: TrainState, lr, aux) -> dict:
  """The step's metrics: the mean loss, whether anything of it is not finite, the
  gradient norm, the learning rate, the memory's fill and the terms' statistics."""
  mean_loss = jax.lax.pmean(loss, DATA_AXIS)
  ok = all_finite((mean_loss, grads, updates, new_state.params, new_state.batch_stats))
  metrics = {
    "loss": mean_loss,
    # 1.0 when anything of this step is NaN/inf; the loop stops on it.
    "nonfinite": jax.lax.pmax(1.0 - ok.astype(jnp.float32), DATA_AXIS),
    "grad_norm": optax.tree.norm(grads),
    "lr": lr,
    "memory_fill": jax.lax.pmean(memory_lib.fill(new_state.memory), DATA_AXIS),
  }
  # The terms' counts are the reductions' inner workings, not metrics.
  metrics.update(device_stats({k: v for k, v in aux.items() if not k.endswith("denominator")}))
  return metrics
