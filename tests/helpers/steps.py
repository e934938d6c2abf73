"""Train-step fixtures: a tiny embedder, its optimiser config, a built step and its
control inputs, fixed batches (used by the step, guard and re-projection tests)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import xbm_jax
from xbm_jax import losses, memory, parallel
from xbm_jax.cross_batch import CrossBatchMemory
from xbm_jax.parallel import DATA_AXIS
from xbm_jax.freshness import moments as drift_correction
from xbm_jax.freshness import momentum
from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.train import optim, state as state_lib, step as step_lib


def optim_cfg(**kw):
  cfg = ml_collections.ConfigDict(
    dict(
      name="adam",
      lr=1e-2,
      weight_decay=5e-4,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      momentum=0.9,
      schedule="constant",
      warmup_steps=0,
    )
  )
  cfg.update(kw)
  return cfg


def xbm_of(memory_state, *, loss="contrastive", memory_options=None, sharded=False):
  """The `CrossBatchMemory` that describes `memory_state` (its size, width, dtype and
  ids), with `loss`, for `make_train_step`."""
  return CrossBatchMemory(
    size=memory_state.emb.shape[0],
    dim=memory_state.emb.shape[1],
    loss=loss,
    memory_options=memory_options,
    dtype=memory_state.emb.dtype,
    ids=memory_state.ids is not None,
    axis_name=DATA_AXIS if sharded else None,
    data_axis=DATA_AXIS,
  )


def build(
  mesh,
  first_batch,
  *,
  loss_name="contrastive",
  loss_kwargs=None,
  memory_loss_kwargs=None,
  mem_size=40,
  accumulate=1,
  memory_state=None,
  sharded=False,
  **step_kw,
):
  """(placed initial state, jitted step) for the tiny embedder on `mesh` (`step_kw`:
  more options of make_train_step; a `MomentsEMA` in the state when they smooth)."""
  model = TinyEmbedder()
  variables = model.init(jax.random.PRNGKey(0), first_batch["image"][:2], train=False)
  direction = optim.make_direction(optim_cfg())
  if memory_state is None:  # storing image ids where the memory term excludes by id
    ids = {**(loss_kwargs or {}), **(memory_loss_kwargs or {})}.get("self_exclusion") == "id"
    memory_state = (
      sharded_memory.init(size=mem_size, dim=8, n_shards=mesh.size, ids=ids)
      if sharded
      else memory.init(size=mem_size, dim=8, ids=ids)
    )
  st = state_lib.create(
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=direction,
    memory=memory_state,
    moments=drift_correction.init(8) if step_kw.get("moments_ema", 0) > 0 else None,
    key_encoder=(
      momentum.init(variables["params"], variables["batch_stats"])
      if step_kw.get("momentum_encoder", 0) > 0
      else None
    ),
  )
  st = jax.device_put(st, step_lib.state_shardings(st, mesh, sharded_memory=sharded))
  train_step = step_lib.make_train_step(
    model=model,
    direction=direction,
    schedule=optim.make_schedule(optim_cfg(), 10),
    xbm=xbm_of(
      memory_state,
      loss=losses.bind(loss_name, **(loss_kwargs or {})),
      memory_options=memory_loss_kwargs,
      sharded=sharded,
    ),
    mesh=mesh,
    accumulate=accumulate,
    **step_kw,
  )
  return st, train_step


def ctrl_of(start_step, weight=1.0, lr_scale=1.0):
  return {
    "start_step": jnp.int32(start_step),
    "xbm_weight": jnp.float32(weight),
    "lr_scale": jnp.float32(lr_scale),
  }


def make_batches(n, seed=0, b=16):
  """`n` batches of 4 rows per class, each row's "index" (image id) one of its
  class's 3 images: every class repeats an image in a batch and across batches."""
  rng = np.random.default_rng(seed)
  out = [
    {
      "image": rng.integers(0, 256, size=(b, 4, 4, 1), dtype=np.uint8),
      "label": np.repeat(rng.permutation(10)[: b // 4], 4).astype(np.int32),
    }
    for _ in range(n)
  ]
  for batch in out:
    batch["index"] = (3 * batch["label"] + np.arange(b) % 3).astype(np.int32)
  return out


class TinyEmbedder(nn.Module):
  """Dense -> BN (across `data`) -> relu -> Dense -> L2: small but has batch stats."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
    x = nn.Dense(32, use_bias=False)(x)  # a bias before BN has ~0 grad: Adam amplifies noise
    x = nn.BatchNorm(
      use_running_average=not train, axis_name=parallel.DATA_AXIS if train else None, momentum=0.9
    )(x)
    return xbm_jax.l2_normalize(nn.Dense(8)(nn.relu(x)))
