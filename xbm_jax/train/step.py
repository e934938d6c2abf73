"""The data-parallel train step: written per device, mapped with `jax.shard_map`.

Per device (the reference's step, with the global batch gathered first):
  1. embed the local batch (train mode; BN statistics averaged over `data`);
  2. `all_gather` embeddings and labels in mesh order -> the global batch;
  3. the library's one call, `losses.xbm_total_loss(local, global batch, memory)`:
     it enqueues the detached global batch (from `start_step` on), so every
     device holds the identical memory (or, sharded, its own rows into its
     shard), then loss = L(local, global batch) + w * L(local, memory);
  4. gradients `pmean`ed.
Each device's loss is its share of the whole batch's (both reductions count over
the whole batch), so the `pmean` over devices equals the 1-device loss: the same
global batch on 1 and on 8 devices gives the same loss and update.

With `drift_correction="moments"` the memory is first moment-matched to the
batch (`xbm_jax.drift_correction`; its smoothed moments live in the state), then
step 3 runs on the corrected memory. With `momentum_encoder=m` the batch that step
3 enqueues is embedded by a momentum (key) encoder in the state
(`xbm_jax.momentum`), one extra forward pass without gradient. With
`reprojection=True` the memory holds the batch's pooled backbone features
(`xbm_jax.reprojection`), enqueued first; step 3's memory term then runs on them
projected through the current head (no gradient through the memory's rows).

With `self_exclusion="id"` (either term) or a memory that stores ids, each row's
image id (`batch["index"]`, its record index in the train split) goes with it into
the losses and the memory, so an anchor's own older copies are never its positives.

Host-side controllers feed `ctrl = {"start_step", "xbm_weight", "lr_scale"}` as
traced scalars, so memory switch-on, weight ramps and learning-rate drops never
recompile the step.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from xbm_jax import drift_correction as drift_lib, losses, memory as memory_lib
from xbm_jax import momentum as momentum_lib, reprojection as reprojection_lib
from xbm_jax import sharded_memory as sharded_lib
from xbm_jax.embeddings import Embeddings
from xbm_jax.parallel import DATA_AXIS
from xbm_jax.train.state import TrainState
from xbm_jax.train.step_stats import all_finite, combine_stats, device_stats

# The values of config.xbm.drift_correction (train/validation.py reads them here).
DRIFT_CORRECTIONS = ("none", "moments")


def state_specs(state: TrainState, *, sharded_memory: bool = False):
  """PartitionSpecs of the train state: replicated, but a sharded memory's rows.

  Specs are full-rank (`P(None, None)` rather than `P()`): that is how the
  step's outputs come back, so the state fed to the next step has the same
  shardings as the first one and the step never recompiles.
  """
  full = lambda x, first=None: P(first, *([None] * (jnp.ndim(x) - 1))) if jnp.ndim(x) else P()
  specs = jax.tree.map(full, state)
  if sharded_memory:
    specs = specs.replace(memory=jax.tree.map(lambda x: full(x, DATA_AXIS), state.memory))
  return specs


def state_shardings(state: TrainState, mesh, *, sharded_memory: bool = False):
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s),
    state_specs(state, sharded_memory=sharded_memory),
    is_leaf=lambda x: isinstance(x, P),
  )


def make_train_step(
  *,
  model,
  direction: optax.GradientTransformation,
  schedule: Callable,
  loss_name: str,
  loss_kwargs: dict,
  memory_loss_kwargs: Optional[dict] = None,
  mesh,
  sharded_memory: bool = False,
  accumulate: int = 1,
  drift_correction: str = "none",
  moments_ema: float = 0.0,
  momentum_encoder: float = 0.0,
  reprojection: bool = False,
) -> Callable:
  """Returns `train_step(state, batch, ctrl) -> (state, metrics)`, jitted.

  Args:
    model: a Flax module, `apply(vars, images, train=True, mutable=["batch_stats"])
      -> [b, D]` float32 unit rows, with BatchNorm `axis_name=DATA_AXIS`.
    direction: optimiser transform without the learning rate (`optim.make_direction`).
    schedule: `step -> lr`.
    loss_name, loss_kwargs, memory_loss_kwargs: see `losses.xbm_total_loss`; the
      loss is a built-in name or an import path "pkg.module:function".
    mesh: 1-D mesh with axis `DATA_AXIS`.
    sharded_memory: the memory's rows are split over the devices
      (`xbm_jax.sharded_memory`): each device enqueues its local batch into its
      shard and the memory term is combined exactly across shards.
    accumulate: gradient accumulation over this many micro-batches per step (to
      train a batch whose activations do not fit). Micro-batch i is rows
      `[i * b / N, (i + 1) * b / N)` of every device's `b` rows; the micro-batches run
      in turn at the step's parameters, and each meets the memory exactly as one
      step of the reference with that smaller batch would: its batch loss is
      against the micro-batch only, its memory loss against the memory holding
      the previous micro-batches (enqueued as each finishes), and its BN
      statistics update in turn. The loss and gradients are the means over the
      micro-batches, applied in one optimiser update; so the loss, memory and BN
      statistics equal N steps on the micro-batches with the parameters frozen
      (tests/train/test_step.py), not one step on the whole batch. With
      reduction="mean" a term is the micro-batches' summed numerators over their
      summed active-pair counts, which a forward pass over the micro-batches
      counts first (one extra forward per step; "paper" needs none).
    drift_correction: "moments": while the memory is active, each (micro-)step
      shifts and scales the memory's valid rows per dimension so that their mean
      and variance match the batch's (`drift_correction.match_moments`, rows
      re-normalised; moments combined exactly across devices and shards), before
      the batch is enqueued and the memory term computed; the corrected rows are
      kept. "none" (default): the reference step.
    moments_ema: with "moments", > 0 matches an exponential moving average of the
      batch moments with this decay instead (`state.moments`, updated every
      (micro-)step); 0: each batch's own moments.
    momentum_encoder: m > 0: the batch enqueued into the memory is embedded by a
      momentum encoder (`state.key_encoder`) instead of the trained one, MoCo's
      way: each step its params move to `m * theta_k + (1 - m) * theta` (theta:
      this step's params, before its update), then it embeds the batch in train
      mode (BatchNorm over the batch across devices; its own running statistics,
      `momentum.update(bn="own")`). One extra forward pass per step, no gradient.
      0 (default): the reference. Needs accumulate=1.
    reprojection: the memory (`state.memory`, emb `[size, F]`) stores the batch's
      pooled backbone features, detached (`features_and_embeddings`: one backbone
      pass), enqueued before the loss as the reference enqueues embeddings; the
      memory term runs on `reprojection.embeddings(memory, current head)`, the
      stored features through this step's head and L2 normalisation (rows
      detached: the head gets gradient from the anchors only, as with a stored
      memory). One `[size, F] x [F, D]` product per step. Needs accumulate=1, no
      drift correction and no momentum encoder.
  The batch is `{"image": [B, H, W, C], "label": [B] int32}` sharded over
  `data`, plus `"index": [B] int` image ids where a term's self_exclusion is "id"
  (the memory, `memory.init(ids=True)`, then stores them); B must divide by the
  mesh size.
  """
  if drift_correction not in DRIFT_CORRECTIONS:
    raise ValueError(f"drift_correction={drift_correction!r}: one of {DRIFT_CORRECTIONS}")
  if momentum_encoder > 0 and accumulate > 1:
    raise ValueError("momentum_encoder > 0 needs accumulate=1")
  if reprojection and (accumulate > 1 or momentum_encoder > 0 or drift_correction != "none"):
    raise ValueError(
      "reprojection needs accumulate=1, momentum_encoder=0 and drift_correction='none'"
    )
  loss_kwargs = dict(loss_kwargs)
  mem_kwargs = {**loss_kwargs, **(memory_loss_kwargs or {})}
  loss_fn = losses.check_loss_options(loss_name, set(mem_kwargs) | set(loss_kwargs))
  memory_ids = mem_kwargs.get("self_exclusion") == "id"
  image_ids = memory_ids or loss_kwargs.get("self_exclusion") == "id"
  # "mean" over micro-batches: the whole step's active pairs are counted first.
  count_first = accumulate > 1 and "mean" in (
    loss_kwargs.get("reduction"),
    mem_kwargs.get("reduction"),
  )

  def corrected(memory, moments, emb, step, ctrl):
    """`(memory, moments)`: with drift correction, the memory moment-matched to this
    (micro-)batch where it is active, and the smoothed moments updated. Computed
    every step and selected (not under `lax.cond`, whose collectives, with a sharded
    memory, could deadlock against the step's on XLA:CPU): O(size * dim), no product."""
    if drift_correction == "none":
      return memory, moments
    valid = jnp.ones(emb.shape[:1], jnp.bool_)
    mean, var, _ = drift_lib.moments(jax.lax.stop_gradient(emb), valid, axis_name=DATA_AXIS)
    if moments is not None:
      moments = drift_lib.update(moments, mean, var, decay=moments_ema)
      mean, var = moments.mean, moments.var
    axis = DATA_AXIS if sharded_memory else None
    matched = drift_lib.match_moments(memory, mean, var, axis_name=axis)
    active = memory_lib.active(step, ctrl["start_step"])
    return memory._replace(emb=jnp.where(active, matched.emb, memory.emb)), moments

  def key_embeddings(key_encoder, params, images):
    """`([b, D] this device's batch embedded by the momentum encoder, the encoder)`:
    its params moved toward `params` first, then its train-mode forward (which
    updates its own BatchNorm statistics). Every step, the memory on or off (under
    `lax.cond` the forward's collectives could deadlock against the step's on XLA:CPU,
    whose devices run independent collectives in their own order)."""
    key_encoder = momentum_lib.update(key_encoder, params, momentum=momentum_encoder)
    emb, new_vars = model.apply(
      momentum_lib.variables(key_encoder), images, train=True, mutable=["batch_stats"]
    )
    stats = new_vars.get("batch_stats", key_encoder.batch_stats)
    return jax.lax.stop_gradient(emb), key_encoder._replace(batch_stats=stats)

  def enqueue_keys(memory, keys, labels, ids, step, ctrl):
    """The memory with this step's key embeddings enqueued where it is active (a
    shard takes its device's rows; a replicated memory the batch gathered alike on
    every device, so that it stays replicated)."""
    active = memory_lib.active(step, ctrl["start_step"])
    rows = Embeddings(keys, labels, ids=ids)
    if sharded_memory:
      return sharded_lib.enqueue_local(memory, rows, when=active)
    gather = lambda x: jax.lax.all_gather(x, DATA_AXIS, tiled=True, to="invarying")
    return memory_lib.enqueue(memory, jax.tree.map(gather, rows), when=active)

  def embed_and_loss(params, batch_stats, carry, rows, step, ctrl, denominators, keys=None):
    """(loss, ((memory, moments), BN statistics, aux)) of one (micro-)batch on this
    device; `carry` is `(memory, moments)`; `rows` its `(images, labels, ids or
    None)`; `keys`: the momentum encoder's embeddings of the batch, enqueued instead
    of the trained encoder's. With reprojection the memory (features) takes the
    batch's pooled features and the loss sees it through the current head."""
    images, labels, ids = rows
    variables = {"params": params, "batch_stats": batch_stats}
    if reprojection:
      (pooled, emb), new_vars = model.apply(
        variables, images, train=True, mutable=["batch_stats"], method="features_and_embeddings"
      )
      keys = pooled  # enqueued (detached) below, as the momentum encoder's keys are
    else:
      emb, new_vars = model.apply(variables, images, train=True, mutable=["batch_stats"])
    memory, moments = corrected(*carry, emb, step, ctrl)
    if keys is not None:
      memory = enqueue_keys(memory, keys, labels, ids, step, ctrl)
    reference = memory
    if reprojection:
      head = reprojection_lib.head_projection(model, params)
      reference = reprojection_lib.embeddings(memory, head, detach=True)
    local = Embeddings(emb, labels, ids=ids)
    glob = jax.tree.map(lambda x: jax.lax.all_gather(x, DATA_AXIS, tiled=True), local)
    total, mem, aux = losses.xbm_total_loss(
      local,
      glob,
      reference,
      step=step,
      start_step=ctrl["start_step"],
      weight=ctrl["xbm_weight"],
      loss=loss_fn,
      axis_name=DATA_AXIS if sharded_memory else None,
      data_axis=DATA_AXIS,
      memory_loss_kwargs=memory_loss_kwargs,
      denominators=denominators,
      enqueue=keys is None,
      **loss_kwargs,
    )
    if reprojection:  # the state keeps the features; `mem` is their projection
      mem = memory
    return total, ((mem, moments), new_vars.get("batch_stats", batch_stats), aux)

  def micro_step(state, batch_stats, carry, rows, ctrl, denominators=None, keys=None):
    """Loss, gradients, BN statistics, (memory, moments) and statistics of one
    (micro-)batch `rows`."""
    objective = lambda p: embed_and_loss(
      p, batch_stats, carry, rows, state.step, ctrl, denominators, keys
    )
    # Differentiate at a "varying" copy of the replicated params: each device's
    # gradient of its own loss, reduced once by the pmean in per_device (at the
    # invariant params the transpose would psum every micro-batch's gradient).
    params = jax.lax.pcast(state.params, DATA_AXIS, to="varying")
    (loss, (carry, new_stats, aux)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return loss, grads, new_stats, carry, aux

  def step_denominators(state, rows, ctrl):
    """`{"batch", "xbm"}`: each term's count over the whole step (all micro-batches and
    devices, from a forward pass over them in turn) / accumulate, so that the mean
    of the micro-batches' losses is the whole step's numerator over its count."""

    def body(carry, xs):
      _, (carry, _, aux) = embed_and_loss(
        state.params, state.batch_stats, carry, xs, state.step, ctrl, None
      )
      return carry, (aux["batch/denominator"], aux["xbm/denominator"])

    carry = (state.memory, state.moments)
    _, (d_batch, d_xbm) = jax.lax.scan(body, carry, split_micro(rows))
    return {"batch": jnp.sum(d_batch) / accumulate, "xbm": jnp.sum(d_xbm) / accumulate}

  def split_micro(rows):
    """`rows` (each `[b, ...]` or None) as `accumulate` micro-batches `[N, b / N, ...]`."""
    if rows[1].shape[0] % accumulate:
      raise ValueError(
        f"the per-device batch {rows[1].shape[0]} does not divide into "
        f"accumulate={accumulate} micro-batches"
      )
    return jax.tree.map(lambda x: x.reshape((accumulate, -1) + x.shape[1:]), rows)

  def accumulated(state, rows, ctrl):
    """`accumulate` micro-batches in turn (see make_train_step), gradients averaged."""
    denominators = step_denominators(state, rows, ctrl) if count_first else None

    def body(carry, xs):
      grad_sum, batch_stats, mem_carry = carry
      loss, grads, batch_stats, mem_carry, aux = micro_step(
        state, batch_stats, mem_carry, xs, ctrl, denominators
      )
      grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
      return (grad_sum, batch_stats, mem_carry), (loss, aux)

    # Per-device gradients ("varying", see micro_step) until the pmean.
    zeros = jax.lax.pcast(jax.tree.map(jnp.zeros_like, state.params), DATA_AXIS, to="varying")
    start = (zeros, state.batch_stats, (state.memory, state.moments))
    (grad_sum, batch_stats, mem_carry), (loss, aux) = jax.lax.scan(body, start, split_micro(rows))
    grads = jax.tree.map(lambda g: g / accumulate, grad_sum)
    aux = combine_stats(aux, lambda x: jnp.sum(x, axis=0))
    return jnp.mean(loss), grads, batch_stats, mem_carry, aux

  def per_device(state: TrainState, rows, ctrl):
    keys, key_encoder = None, state.key_encoder
    if momentum_encoder > 0:
      keys, key_encoder = key_embeddings(state.key_encoder, state.params, rows[0])
    if accumulate == 1:
      loss, grads, batch_stats, (mem, moments), aux = micro_step(
        state, state.batch_stats, (state.memory, state.moments), rows, ctrl, keys=keys
      )
    else:
      loss, grads, batch_stats, (mem, moments), aux = accumulated(state, rows, ctrl)
    grads = jax.lax.pmean(grads, DATA_AXIS)
    updates, opt_state = direction.update(grads, state.opt_state, state.params)
    lr = schedule(state.step) * ctrl["lr_scale"]
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
    mean_loss = jax.lax.pmean(loss, DATA_AXIS)
    ok = all_finite((mean_loss, grads, updates, params, batch_stats))
    metrics = {
      "loss": mean_loss,
      # 1.0 when anything of this step is NaN/inf; the loop stops on it.
      "nonfinite": jax.lax.pmax(1.0 - ok.astype(jnp.float32), DATA_AXIS),
      "grad_norm": optax.tree.norm(grads),
      "lr": lr,
      "memory_fill": jax.lax.pmean(memory_lib.fill(mem), DATA_AXIS),
    }
    # The terms' counts are the reductions' inner workings, not metrics.
    metrics.update(device_stats({k: v for k, v in aux.items() if not k.endswith("denominator")}))
    return new_state, metrics

  def batch_ids(state, batch):
    """`[B]` int32 image ids of the batch's rows where a loss or the memory uses them."""
    if not (image_ids or state.memory.ids is not None):
      return None
    if "index" not in batch:
      raise ValueError(
        'self_exclusion="id" and a memory storing ids need batch["index"]: [B] int '
        "image ids (the train pipeline's record indices)"
      )
    if memory_ids and state.memory.ids is None:
      raise ValueError(
        'the memory term\'s self_exclusion="id" needs a memory storing ids: '
        "memory.init(..., ids=True)"
      )
    return batch["index"].astype(jnp.int32)

  def train_step(state, batch, ctrl):
    smoothed = drift_correction == "moments" and moments_ema > 0
    if smoothed != (state.moments is not None):
      raise ValueError(
        f"state.moments must be a drift_correction.MomentsEMA exactly when "
        f"drift_correction='moments' and moments_ema > 0 (here {drift_correction!r}, "
        f"{moments_ema}); got {type(state.moments).__name__}"
      )
    if (momentum_encoder > 0) != (state.key_encoder is not None):
      raise ValueError(
        f"state.key_encoder must be a momentum.MomentumEncoder exactly when "
        f"momentum_encoder > 0 (here {momentum_encoder}); got "
        f"{type(state.key_encoder).__name__}"
      )
    specs = state_specs(state, sharded_memory=sharded_memory)
    mapped = jax.shard_map(
      per_device, mesh=mesh, in_specs=(specs, P(DATA_AXIS), P()), out_specs=(specs, P())
    )
    return mapped(state, (batch["image"], batch["label"], batch_ids(state, batch)), ctrl)

  return jax.jit(train_step, donate_argnums=(0,))


def make_embed_fn(model, mesh, *, method: Optional[str] = None) -> Callable:
  """`embed(variables, images [B, ...]) -> [B, D]` eval-mode, sharded over `data`
  (`method="features"`: the pooled features `[B, F]`)."""

  def per_device(variables, images):
    return model.apply(variables, images, train=False, method=method)

  return jax.jit(
    jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(DATA_AXIS))
  )
