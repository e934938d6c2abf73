"""The data-parallel train step: written per device (`device_step`), mapped with
`jax.shard_map`.

Per device (the reference's step, with the global batch gathered first):
  1. embed the local batch (train mode; BN statistics averaged over `data`);
  2. `all_gather` embeddings and labels in mesh order -> the global batch;
  3. the memory's one call, `xbm.update(local, global batch, memory)` (the
     `CrossBatchMemory` built from the config, `setup.cross_batch_memory`):
     it enqueues the detached global batch (from `start_step` on), so every
     device holds the identical memory (or, sharded, its own rows into its
     shard), then loss = L(local, global batch) + w * L(local, memory);
  4. gradients `pmean`ed.
Each device's loss is its share of the whole batch's (both reductions count over
the whole batch), so the `pmean` over devices equals the 1-device loss: the same
global batch on 1 and on 8 devices gives the same loss and update.

With `drift_correction="moments"` the memory is first moment-matched to the
batch (`xbm_jax.freshness.moments`; its smoothed moments live in the state), then
step 3 runs on the corrected memory. With `momentum_encoder=m` the batch that step
3 enqueues is embedded by a momentum (key) encoder in the state
(`xbm_jax.freshness.momentum`), one extra forward pass without gradient. With
`reprojection=True` the memory holds the batch's pooled backbone features
(`xbm_jax.freshness.reprojection`), enqueued first; step 3's memory term then runs on them
projected through the current head (no gradient through the memory's rows).

With `self_exclusion="id"` (either term) or a memory that stores ids, each row's
image id (`batch["index"]`, its record index in the train split) goes with it into
the losses and the memory, so an anchor's own older copies are never its positives.

Host-side controllers feed `ctrl = {"start_step", "xbm_weight", "lr_scale"}` as
traced scalars, so memory switch-on, weight ramps and learning-rate drops never
recompile the step.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from xbm_jax.cross_batch import CrossBatchMemory
from xbm_jax.parallel import DATA_AXIS
from xbm_jax.train import device_step
from xbm_jax.train.state import TrainState

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
  xbm: CrossBatchMemory,
  mesh,
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
    xbm: the memory's settings and its loss, bound once (`CrossBatchMemory`; its
      `weight` and `start_step` are overridden each step by `ctrl`'s traced gates).
      With `xbm.axis_name` the memory's rows are split over the devices
      (`xbm_jax.memory.sharded`): each device enqueues its local batch into its
      shard and the memory term is combined exactly across shards.
    mesh: 1-D mesh with axis `DATA_AXIS`.
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
  problem = freshness_conflict(
    drift_correction=drift_correction,
    momentum_encoder=momentum_encoder,
    reprojection=reprojection,
    accumulate=accumulate,
  )
  if problem:
    raise ValueError(problem)
  if xbm.axis_name not in (None, DATA_AXIS):
    raise ValueError(f"xbm.axis_name must be None or {DATA_AXIS!r}; got {xbm.axis_name!r}")
  loss_kwargs, mem_kwargs = xbm.loss_options, xbm.memory_term_options
  memory_ids = mem_kwargs.get("self_exclusion") == "id"
  settings = device_step.StepSettings(
    model=model,
    direction=direction,
    schedule=schedule,
    xbm=xbm,
    accumulate=accumulate,
    drift_correction=drift_correction,
    moments_ema=moments_ema,
    momentum_encoder=momentum_encoder,
    reprojection=reprojection,
    memory_ids=memory_ids,
    image_ids=memory_ids or loss_kwargs.get("self_exclusion") == "id",
    count_first=accumulate > 1
    and "mean" in (loss_kwargs.get("reduction"), mem_kwargs.get("reduction")),
  )
  per_device = functools.partial(device_step.per_device, settings)

  def train_step(state, batch, ctrl):
    _check_state(settings, state)
    specs = state_specs(state, sharded_memory=settings.sharded_memory)
    mapped = jax.shard_map(
      per_device, mesh=mesh, in_specs=(specs, P(DATA_AXIS), P()), out_specs=(specs, P())
    )
    return mapped(state, (batch["image"], batch["label"], _batch_ids(settings, state, batch)), ctrl)

  return jax.jit(train_step, donate_argnums=(0,))


def freshness_conflict(
  *, drift_correction: str, momentum_encoder: float, reprojection: bool, accumulate: int
) -> Optional[str]:
  """The one statement of which ways of keeping the memory current combine (with each
  other and with accumulation), worded in config keys; None when they do. Called by
  `make_train_step` and by the config's validation (`validation_xbm`)."""
  if momentum_encoder > 0 and accumulate > 1:
    return (
      f"config.xbm.momentum_encoder={momentum_encoder} embeds each step's whole batch: "
      f"it needs config.train.accumulate=1 (got {accumulate})"
    )
  if reprojection:
    clashes = {
      "xbm.momentum_encoder": (momentum_encoder > 0, momentum_encoder),  # embeddings
      "xbm.drift_correction": (drift_correction != "none", drift_correction),  # rescales
      "train.accumulate": (accumulate > 1, accumulate),
    }
    for key, (clash, value) in clashes.items():
      if clash:
        return (
          f"config.xbm.reprojection=True stores pooled features: it cannot be combined "
          f"with config.{key}={value!r}"
        )
  return None


def _check_state(s: device_step.StepSettings, state: TrainState) -> None:
  """Raises ValueError where the state's optional parts do not fit the options."""
  smoothed = s.drift_correction == "moments" and s.moments_ema > 0
  if smoothed != (state.moments is not None):
    raise ValueError(
      f"state.moments must be a drift_correction.MomentsEMA exactly when "
      f"drift_correction='moments' and moments_ema > 0 (here {s.drift_correction!r}, "
      f"{s.moments_ema}); got {type(state.moments).__name__}"
    )
  if (s.momentum_encoder > 0) != (state.key_encoder is not None):
    raise ValueError(
      f"state.key_encoder must be a momentum.MomentumEncoder exactly when "
      f"momentum_encoder > 0 (here {s.momentum_encoder}); got "
      f"{type(state.key_encoder).__name__}"
    )


def _batch_ids(s: device_step.StepSettings, state: TrainState, batch):
  """`[B]` int32 image ids of the batch's rows where a loss or the memory uses them."""
  if not (s.image_ids or state.memory.ids is not None):
    return None
  if "index" not in batch:
    raise ValueError(
      'self_exclusion="id" and a memory storing ids need batch["index"]: [B] int '
      "image ids (the train pipeline's record indices)"
    )
  if s.memory_ids and state.memory.ids is None:
    raise ValueError(
      'the memory term\'s self_exclusion="id" needs a memory storing ids: '
      "memory.init(..., ids=True)"
    )
  return batch["index"].astype(jnp.int32)


def make_embed_fn(model, mesh, *, method: Optional[str] = None) -> Callable:
  """`embed(variables, images [B, ...]) -> [B, D]` eval-mode, sharded over `data`
  (`method="features"`: the pooled features `[B, F]`)."""

  def per_device(variables, images):
    return model.apply(variables, images, train=False, method=method)

  return jax.jit(
    jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(DATA_AXIS))
  )
