"""Classification pretraining of an embedding model (the "ImageNet backbone" of the memory study's paper regime).

The XBM paper fine-tunes an ImageNet-pretrained network; the glyph analog pretrains the
glyph configs' own ``EmbeddingModel`` on a disjoint character corpus
(``xbm_jax.data.glyph_corpus``) by softmax classification of each image among the classes
of its P x K batch, through the unit embedding (the N-pair / NCA form: the other K - 1
images of a class are its prototype). Classifying through the normalised embedding trains
the head with the backbone and shapes it for cosine retrieval, what fine-tuning uses.

Why not a learned class-weight (normalised-softmax) head over all 3,390 classes: tried
first, it did not learn in a CPU-sized run (500 steps, < 1 epoch; loss stuck above
ln 3390 and train accuracy 0.000 at step 250, Adam, class weights at 1x and 10x the lr):
each weight sees its class a handful of times, while Adam moves every weight a full step
each iteration on its tiny negative gradient. The batch softmax needs no class weights,
so every step teaches; there is nothing to throw away at export either: ``export`` writes
the embedding model's params + batch_stats in ``checkpoint.export_params``' format
(loadable with ``config.train.init_from=FILE.msgpack``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from xbm_jax import models
from xbm_jax.data import pipeline, sources


def batch_softmax_loss(
  emb: jax.Array, labels: jax.Array, scale: float
) -> tuple[jax.Array, jax.Array]:
  """Softmax classification of each row among the batch's classes (N-pair / NCA style).

  Args:
    emb: [B, D] float32 unit rows; labels: [B] int (P x K batch, K >= 2).
    scale: inverse temperature of ``scale * cos``.
  Returns:
    loss: mean over rows of -log(sum of softmax mass on the row's other same-class rows),
      the softmax over all other rows of the batch.
    accuracy: fraction of rows whose most similar other row has the same class.
  """
  logits = scale * emb @ emb.T
  logits = jnp.where(jnp.eye(emb.shape[0], dtype=bool), -jnp.inf, logits)
  same = (labels[:, None] == labels[None, :]) & ~jnp.eye(emb.shape[0], dtype=bool)
  log_p = jax.nn.log_softmax(logits, axis=1)
  loss = -jnp.mean(jax.nn.logsumexp(jnp.where(same, log_p, -jnp.inf), axis=1))
  acc = jnp.mean(same[jnp.arange(emb.shape[0]), logits.argmax(1)])
  return loss, acc


def make_step(model: nn.Module, tx: optax.GradientTransformation, scale: float):
  """The jitted step: ``(params, batch_stats, opt_state, images, labels) ->
  (params, batch_stats, opt_state, loss, accuracy)``."""

  def loss_fn(params, batch_stats, images, labels):
    emb, upd = model.apply(
      {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    loss, acc = batch_softmax_loss(emb, labels, scale)
    return loss, (upd["batch_stats"], acc)

  @jax.jit
  def step(params, batch_stats, opt_state, images, labels):
    (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch_stats, images, labels
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, acc

  return step


def pretrain(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  model_cfg: Mapping[str, Any],
  transform_cfg: Mapping[str, Any],
  steps: int,
  batch_size: int = 128,
  samples_per_class: int = 2,
  lr: float = 1e-3,
  warmup: int = 100,
  scale: float = 10.0,
  seed: int = 0,
  log_every: int = 50,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Trains ``models.create(model_cfg)`` by batch-softmax classification of ``labels``.

  Args:
    images: uint8 [N, H, W, C]; labels: int [N] class ids.
    transform_cfg: the train augmentation (the glyph configs' ``input.transform``).
    steps, batch_size, samples_per_class: P x K batches (P = batch_size / K classes).
    lr, warmup: Adam, linear warmup then cosine decay to 0 (a short run ends annealed).
    scale: inverse temperature of the batch softmax (``batch_softmax_loss``).
  Returns:
    {"params", "batch_stats"} of the embedding model alone, "step", and "history":
    a list of (step, mean loss, mean in-batch train accuracy) per ``log_every`` window.
  """
  model = models.create(model_cfg)
  variables = models.init_variables(
    model, jax.random.key(seed), image_size=int(transform_cfg["crop"]), channels=images.shape[-1]
  )
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps // 2), steps))
  opt_state = tx.init(params)
  step_fn = make_step(model, tx, scale)
  batches = pipeline.train_batches(
    sources.ArraySource(images, np.asarray(labels, np.int64)),
    sampler={
      "classes_per_batch": batch_size // samples_per_class,
      "samples_per_class": samples_per_class,
    },
    transform_cfg=transform_cfg,
    global_batch_size=batch_size,
    seed=seed,
    num_steps=steps,
    worker_count=0,
  )
  history, window, t0 = [], [], time.time()
  try:
    for i, batch in enumerate(batches, start=1):
      params, batch_stats, opt_state, loss, acc = step_fn(
        params, batch_stats, opt_state, batch["image"], batch["label"]
      )
      window.append((loss, acc))
      if i % log_every == 0 or i == steps:
        loss_m, acc_m = (float(np.mean([float(v[j]) for v in window])) for j in (0, 1))
        history.append((i, loss_m, acc_m))
        log(
          f"step {i}/{steps}: loss {loss_m:.3f}  train acc {acc_m:.3f}  ({time.time() - t0:.0f} s)"
        )
        window = []
  finally:
    batches.close()
  return {"params": params, "batch_stats": batch_stats, "step": steps, "history": history}


def export(result: Mapping[str, Any], out: str) -> None:
  """Writes params + batch_stats (+ step) as ``checkpoint.export_params`` does (atomic)."""
  from xbm_jax.train import checkpoint  # pylint: disable=g-import-not-at-top

  checkpoint.write_params(out, dict(result), int(result["step"]))
