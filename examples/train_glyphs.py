"""XBM in your own JAX training loop: flax + optax, data-parallel with `jax.shard_map`.

A complete, short loop on the glyph dataset embedded in the repository (no
download): a small flax MLP embeds 32x32 glyph images; the loss is written
here, once, per anchor row (`xbm_jax.losses.pairs.pair_loss`); one call per step
(`xbm_jax.losses.xbm_total_loss`) enqueues the batch into the cross-batch
memory and adds the memory term. The batch is split over the local devices
("data"), the memory replicated. Recall@1 on unseen characters is printed
before and after.

    python examples/train_glyphs.py --steps 300
    # more (fake) devices on a CPU:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/train_glyphs.py
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import xbm_jax
from xbm_jax.data import glyphs

AXIS = "data"


@xbm_jax.losses.pairs.pair_loss
def squared_hinge(sim, pos, neg, *, margin=0.5):
  """One anchor's row `[R]`: (1 - S)^2 on positives, (S - margin)^2 on negatives
  above the margin. Returns (loss, active pairs) so that reduction="mean" works."""
  hard_neg = neg & (sim > margin)
  loss = jnp.sum(
    jnp.where(pos, (1 - sim) ** 2, 0.0) + jnp.where(hard_neg, (sim - margin) ** 2, 0.0)
  )
  return loss, jnp.sum(pos) + jnp.sum(hard_neg)


class Embedder(nn.Module):
  dim: int = 32

  @nn.compact
  def __call__(self, images):  # [b, 32, 32, 1] uint8 -> [b, dim] unit rows
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
    x = nn.relu(nn.Dense(256)(x))
    return xbm_jax.l2_normalize(nn.Dense(self.dim)(x))


def make_step(model, tx, mesh, *, start_step, margin):
  """`step(params, opt_state, mem, images, labels, t) -> (params, opt_state, mem, loss)`."""
  gather = lambda x: jax.lax.all_gather(x, AXIS, tiled=True)

  def per_device(params, opt_state, mem, images, labels, t):
    def objective(p):
      emb = model.apply(p, images)
      local = xbm_jax.Embeddings(emb, labels)  # this device's rows
      batch = xbm_jax.Embeddings(gather(emb), gather(labels))  # the global batch
      total, new_mem, aux = xbm_jax.losses.xbm_total_loss(
        local, batch, mem, step=t, start_step=start_step, loss=squared_hinge, margin=margin
      )
      # The mean over devices is the whole batch's loss: its gradient is the step's.
      return jax.lax.pmean(total, AXIS), new_mem

    (loss, mem), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, mem, loss

  return jax.jit(
    jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(P(), P(), P(), P(AXIS), P(AXIS), P()),
      out_specs=(P(), P(), P(), P()),
    ),
    donate_argnums=(2,),
  )


def sample_batch(rng, labels, classes, *, batch_size, per_class):
  """Row indices of `batch_size / per_class` random classes, `per_class` rows each."""
  out = []
  for c in rng.choice(classes, batch_size // per_class, replace=False):
    rows = np.flatnonzero(labels == c)
    out.append(rng.choice(rows, per_class, replace=len(rows) < per_class))
  return np.concatenate(out)


def recall_at_1(model, params, images, labels) -> float:
  """Leave-one-out Recall@1 by cosine similarity."""
  emb = np.asarray(jax.jit(model.apply)(params, images))
  sim = emb @ emb.T
  np.fill_diagonal(sim, -np.inf)
  return float(np.mean(labels[np.argmax(sim, axis=1)] == labels))


def main(*, steps=300, batch_size=64, per_class=4, classes=300, memory_size=2048, seed=0):
  mesh = jax.make_mesh((jax.local_device_count(),), (AXIS,))
  if batch_size % mesh.size:
    raise ValueError(f"batch_size={batch_size} must divide by the {mesh.size} devices")
  train, test = glyphs.load_arrays("train"), glyphs.load_arrays("test")
  rng = np.random.default_rng(seed)
  train_classes = rng.choice(np.unique(train["labels"]), classes, replace=False)
  test_keep = np.isin(test["labels"], np.unique(test["labels"])[:100])
  test_images, test_labels = test["images"][test_keep], test["labels"][test_keep]

  model, tx = Embedder(), optax.adam(1e-3)
  params = model.init(jax.random.PRNGKey(seed), train["images"][:1])
  opt_state = tx.init(params)
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
  mem = jax.device_put(xbm_jax.memory.init(size=memory_size, dim=model.dim), replicated)
  params, opt_state = jax.device_put((params, opt_state), replicated)
  step = make_step(model, tx, mesh, start_step=steps // 5, margin=0.5)

  before = recall_at_1(model, params, test_images, test_labels)
  losses = []
  for t in range(steps):
    idx = sample_batch(
      rng, train["labels"], train_classes, batch_size=batch_size, per_class=per_class
    )
    images = jax.device_put(train["images"][idx], rows)
    labels = jax.device_put(train["labels"][idx].astype(np.int32), rows)
    params, opt_state, mem, loss = step(params, opt_state, mem, images, labels, jnp.int32(t))
    losses.append(float(loss))
  after = recall_at_1(model, params, test_images, test_labels)
  fill = float(xbm_jax.memory.fill(mem))
  print(
    f"{mesh.size} devices, {steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
    f"memory {fill:.0%} full, Recall@1 on unseen characters {before:.3f} -> {after:.3f}"
  )
  return {"recall_before": before, "recall_after": after, "losses": losses, "memory_fill": fill}


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--batch_size", type=int, default=64)
  ap.add_argument("--memory_size", type=int, default=2048)
  args = ap.parse_args()
  main(steps=args.steps, batch_size=args.batch_size, memory_size=args.memory_size)
