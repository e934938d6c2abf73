"""A momentum (key) encoder: an exponential moving average of the parameters (MoCo).

The memory's entries go stale because the encoder that wrote them keeps moving.
MoCo (He et al., CVPR 2020, Eq. 2) embeds what is enqueued with a slowly moving
copy of the encoder instead,

    theta_k <- m * theta_k + (1 - m) * theta_q,   m ~ 0.99 .. 0.999,

so that consecutive entries come from nearly the same encoder. The state is an
optax-style immutable pytree; nothing here runs the model:

    ema = momentum.init(params, batch_stats)
    # in the step: embed the batch to enqueue with the key encoder, in train mode
    # as MoCo does (its BatchNorm normalises with the batch's statistics)
    key_emb, upd = model.apply(momentum.variables(ema), images, train=True,
                               mutable=["batch_stats"])
    ema = momentum.update(ema, new_params, upd["batch_stats"], momentum=0.999)

Cost: one extra forward pass per step (no backward), and one more copy of the
parameters and BatchNorm statistics in the train state.

BatchNorm statistics (`bn=`):
  "own" (default, MoCo v1/v2): the momentum update runs over the query encoder's
    `parameters()` only (facebookresearch/moco `builder.py`,
    `_momentum_update_key_encoder`); BatchNorm running means and variances are
    buffers, not parameters, so the key encoder's are neither averaged nor
    copied: they move only through the key encoder's own train-mode forwards.
    Pass the statistics that forward returns; they are stored as they are.
  "ema": the statistics passed (the online model's) are averaged with the same
    momentum as the parameters (the model-EMA convention, e.g. timm's
    `ModelEmaV2`), for a key encoder run in eval mode.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

BN_RULES = ("own", "ema")


class MomentumEncoder(NamedTuple):
  """The key encoder's variables (an optax-style state).

  Attributes:
    params: pytree of float arrays, the same structure as the model's params.
    batch_stats: pytree of float arrays, the key encoder's BatchNorm statistics
      (an empty dict for a model without BatchNorm).
    steps: `[]` int32 number of updates so far.
  """

  params: Any
  batch_stats: Any
  steps: jax.Array


def init(params, batch_stats=None) -> MomentumEncoder:
  """A key encoder equal to the query encoder (MoCo copies it at the start).

  The leaves are copied (fresh buffers), so donating the train state's params
  never invalidates the key encoder's.
  """
  _check_float_leaves(params, "params")
  batch_stats = {} if batch_stats is None else batch_stats
  _check_float_leaves(batch_stats, "batch_stats")
  copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
  return MomentumEncoder(copy(params), copy(batch_stats), jnp.zeros((), jnp.int32))


def variables(ema: MomentumEncoder) -> dict:
  """`{"params", "batch_stats"}` of the key encoder, for `model.apply`."""
  return {"params": ema.params, "batch_stats": ema.batch_stats}


def update(
  ema: MomentumEncoder, params, batch_stats=None, *, momentum, bn: str = "own"
) -> MomentumEncoder:
  """One momentum step: `theta_k <- m * theta_k + (1 - m) * theta` over every leaf.

  Args:
    ema: the key encoder so far.
    params: the query encoder's params (same tree structure and shapes).
    batch_stats: with `bn="own"`, the key encoder's statistics as its own
      train-mode forward updated them (stored as given; None keeps the stored
      ones); with `bn="ema"`, the query encoder's (averaged in).
    momentum: `[]` m in [0, 1] (float or traced, e.g. a schedule); 0 copies
      the query encoder, 1 freezes the key encoder.
    bn: "own" (MoCo) or "ema"; see the module docstring.
  Returns:
    The new `MomentumEncoder`, leaves in the stored dtypes. Raises ValueError
    (before anything is computed) for a momentum outside [0, 1], an unknown
    `bn`, or trees that do not match the stored ones.
  """
  if isinstance(momentum, (int, float)) and not 0.0 <= momentum <= 1.0:
    raise ValueError(f"momentum must be in [0, 1]; got {momentum}")
  if bn not in BN_RULES:
    raise ValueError(f"bn must be one of {BN_RULES}; got {bn!r}")
  _check_like(params, ema.params, "params")
  if batch_stats is None:
    if bn == "ema":
      raise ValueError('bn="ema" needs the query encoder\'s batch_stats; got None')
    batch_stats = ema.batch_stats
  _check_like(batch_stats, ema.batch_stats, "batch_stats")
  step_size = 1.0 - jnp.asarray(momentum, jnp.float32)
  new_params = _average(params, ema.params, step_size)
  if bn == "ema":
    new_stats = _average(batch_stats, ema.batch_stats, step_size)
  else:
    new_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), batch_stats, ema.batch_stats)
  return MomentumEncoder(new_params, new_stats, ema.steps + 1)


def _average(new, old, step_size):
  """`step_size * new + (1 - step_size) * old` per leaf (optax's incremental
  update), computed in float32, stored in `old`'s dtype; no gradient flows."""
  new = jax.lax.stop_gradient(new)
  up = lambda x: x.astype(jnp.float32)
  out = optax.incremental_update(jax.tree.map(up, new), jax.tree.map(up, old), step_size)
  return jax.tree.map(lambda x, ref: x.astype(ref.dtype), out, old)


def _check_float_leaves(tree, name: str) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
        f"{name}{jax.tree_util.keystr(path)} must be a float array; got {jnp.result_type(leaf)}"
      )


def _check_like(tree, stored, name: str) -> None:
  """A one-line ValueError naming `name` when `tree` differs from `stored` in
  structure or any leaf's shape."""
  if jax.tree.structure(tree) != jax.tree.structure(stored):
    raise ValueError(f"{name} do not match the key encoder's tree structure")
  _check_float_leaves(tree, name)
  for (path, leaf), ref in zip(
    jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(stored), strict=True
  ):
    if jnp.shape(leaf) != jnp.shape(ref):
      raise ValueError(
        f"{name}{jax.tree_util.keystr(path)} has shape {tuple(jnp.shape(leaf))}; "
        f"the key encoder's is {tuple(jnp.shape(ref))}"
      )
