"""The one train-state pytree: step, params, batch_stats, opt_state, memory, and the
state of the memory's drift corrections (when on)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from xbm_jax.memory import MemoryState


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training; changed only by the jitted step.

  Attributes:
    step: `[]` int32, the number of optimiser updates done.
    params, batch_stats: the model's Flax variables.
    opt_state: the optax state.
    memory: the cross-batch memory (`MemoryState`).
    moments: the smoothed batch moments of the moment-matching drift correction
      (`drift_correction.MomentsEMA`, replicated) with `xbm.moments_ema > 0`;
      None (no leaves) otherwise.
    key_encoder: the momentum encoder that embeds the enqueued batch
      (`momentum.MomentumEncoder`, replicated) with `xbm.momentum_encoder > 0`;
      None otherwise.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  memory: MemoryState
  moments: Any = None
  key_encoder: Any = None


def create(
  *, params, batch_stats, tx, memory: MemoryState, moments=None, key_encoder=None
) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(params),
    memory=memory,
    moments=moments,
    key_encoder=key_encoder,
  )
