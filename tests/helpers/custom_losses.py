"""A user's own pair loss, written both ways (`pair_loss`, `reduction_loss`): used by the
pair-loss tests and, by import path (`tests.helpers.custom_losses:margin_rank_row`), by
the train-step tests."""

import jax
import jax.numpy as jnp
from xbm_jax.losses import pairs

sg = jax.lax.stop_gradient


@pairs.pair_loss
def margin_rank_row(sim, pos, neg, *, margin=0.2):
  """One anchor's row: hinge of each negative against the mean positive similarity."""
  n_pos = jnp.sum(pos)
  mean_pos = jnp.sum(jnp.where(pos, sim, 0.0)) / jnp.maximum(n_pos, 1)
  hinge = jnp.where(neg & (n_pos > 0), jax.nn.relu(sim - mean_pos + margin), 0.0)
  return jnp.sum(hinge), jnp.sum(hinge > 0)


@pairs.reduction_loss
def margin_rank_rows(rows, *, margin=0.2):
  """The same loss on all rows with cross-shard reductions."""
  n_pos = rows.count(rows.pos)
  mean_pos = rows.sum(rows.sim, rows.pos) / jnp.maximum(n_pos, 1)
  hinge = jax.nn.relu(rows.sim - mean_pos[:, None] + margin)
  active = rows.neg & (n_pos > 0)[:, None] & (sg(hinge) > 0)
  return rows.sum(hinge, active), rows.count(active)
