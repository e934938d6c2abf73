"""Optimisers and learning-rate schedules from `config.optim`.

The optimiser transforms return *unscaled* directions; the step multiplies
them by `-lr(step) * lr_scale`, where `lr_scale` is a traced scalar fed by the
host-side `Plateau` controller (reduce-on-plateau on an eval metric, the
reference's choice), so changing the learning rate never recompiles.
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "step", "cosine", "plateau")


def make_direction(cfg) -> optax.GradientTransformation:
  """Adam with coupled L2 weight decay on all params (the reference: torch Adam's
  `weight_decay` adds wd * w to the gradient before the moments), AdamW
  (decoupled), or SGD with momentum and coupled L2."""
  name, wd = cfg.name, float(cfg.weight_decay)
  if name == "adam":
    return optax.chain(
      optax.add_decayed_weights(wd), optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    )
  if name == "adamw":
    return optax.chain(
      optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps), optax.add_decayed_weights(wd)
    )
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(wd), optax.trace(decay=cfg.momentum))
  raise ValueError(f"config.optim.name: unknown optimiser {name!r}; valid: {OPTIMIZERS}")


def make_schedule(cfg, total_steps: int) -> Callable:
  """`step -> lr` (before the plateau scale), from optax schedules.

  With `warmup_steps` = w > 0 the first w steps rise linearly, `lr * (s + 1) / w`
  (so step 0 already trains), then the schedule proper takes over: "step" and
  "constant" read the absolute step, "cosine" decays over the remaining steps.
  """
  lr, kind = float(cfg.lr), cfg.schedule
  warmup = int(cfg.get("warmup_steps", 0))
  if kind in ("constant", "plateau"):
    main = optax.constant_schedule(lr)
  elif kind == "step":
    main = optax.exponential_decay(
      lr, transition_steps=int(cfg.decay_every), decay_rate=float(cfg.decay_factor), staircase=True
    )
  elif kind == "cosine":
    cosine = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup, 1))
    main = lambda s: cosine(jnp.maximum(s - warmup, 0))
  else:
    raise ValueError(f"config.optim.schedule: unknown schedule {kind!r}; valid: {SCHEDULES}")
  if warmup <= 0:
    return main
  # lr / w at step 0 to lr at step w - 1: exactly lr * (s + 1) / w.
  warm = optax.linear_schedule(lr / warmup, lr, transition_steps=warmup - 1)
  return lambda s: jnp.where(s < warmup, warm(s), main(s))


class Plateau:
  """Host-side reduce-on-plateau over an eval metric (higher is better).

  After `patience` evaluations without an improvement of more than `threshold`
  over the best so far, the scale is multiplied by `factor` (not below
  `min_scale`) and the patience counter restarts.
  """

  def __init__(self, *, factor=0.5, patience=4, threshold=1e-4, min_scale=1e-3):
    self.factor, self.patience = float(factor), int(patience)
    self.threshold, self.min_scale = float(threshold), float(min_scale)
    self.scale, self.best, self.bad = 1.0, -math.inf, 0

  def update(self, value: float) -> float:
    if value > self.best + self.threshold:
      self.best, self.bad = value, 0
    else:
      self.bad += 1
      if self.bad >= self.patience:
        self.scale = max(self.scale * self.factor, self.min_scale)
        self.bad = 0
    return self.scale

  def state_dict(self) -> dict:
    return {"scale": self.scale, "best": self.best, "bad": self.bad}

  def load_state_dict(self, d: dict) -> None:
    self.scale, self.best, self.bad = float(d["scale"]), float(d["best"]), int(d["bad"])
