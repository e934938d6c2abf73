"""The glyph study's arms (`configs/glyphs.py:study`, OUT = benchmarks/out/study); the
testbed's are in study_cjk.py. `arms(smoke)` lists both, each with its paired baseline.

- batch_size: no memory, B = 32 / 64 / 128 / 256 (K = 4), equal steps, lr tuned per B,
  contrastive loss (and multi-similarity in `batch_size_ms`). "A big batch for the price
  of a small one": if a bigger batch does not beat B = 64, no memory can.
- fair: B = 64 from scratch, memory 8,192 switched on at step 100: no memory; the paper's
  summed memory term; the memory term averaged over its active pairs; the drift-aware
  auto start. lr (and weight) tuned per arm.
- guard: the warm-start regime, memory on at step 100, the drift guard.
- guard_paired: from scratch, memory from step 300: the paired guard (`xbm.guard=paired`).
- pretrained: the paper's regime in miniature (`glyphs.py:study,pretrained`), lr tuned.
- memsize: the pretrained regime, averaged term, memory 0 / 1k / 3k / 6k (whole train set).
- margin: the pretrained regime, the contrastive margin tuned for no memory and the summed
  memory term alike (0.5 .. 0.8).
- pretrained_batch: the pretrained regime, no memory, B = 64 and 256, lr tuned per B.
- long: the pretrained regime for 4,000 steps (10x), val R@1 every 200 steps.
- long8k: the long stage's no-memory and summed-memory runs resumed to 8,000 steps (20x).
- pretrained_drift: the pretrained regime's summed memory arm with the fresh-memory oracle
  and the momentum encoder.
- batch_size_ms: the batch-size curve with multi-similarity (defined, not run yet).
- cjk, cjk_controls, cjk_drift, cjk_batch: the SOP-shaped testbed (`configs/cjk.py`, OUT =
  benchmarks/out/cjk; the arms in benchmarks/study_cjk.py).
"""

from __future__ import annotations

import dataclasses
import os

import study_cjk  # benchmarks/, next to this script
from study_records import Arm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAINED = "study,pretrained"  # `configs/glyphs.py` variant of the paper's regime


def _batch_arms(stage, loss, lrs, sizes=(32, 64, 128, 256)):
  return [
    Arm(
      stage,
      f"{loss}_B{b}",
      {"loss.name": loss, "xbm.enabled": False, "input.batch_size": b},
      {"optim.lr": lrs},
      x=b,
      group=loss,
    )
    for b in sizes
  ]


def _fair_arms(lrs):
  mem = {"xbm.enabled": True, "xbm.size": 8192, "xbm.start_step": 100}
  return [
    Arm("fair", "no_memory", {"xbm.enabled": False}, {"optim.lr": lrs}),
    Arm("fair", "memory_paper_sum", mem, {"optim.lr": lrs, "xbm.weight": (0.1, 1.0)}),
    Arm(
      "fair",
      "memory_mean",
      {**mem, "xbm.memory_loss_kwargs.reduction": "mean"},
      {"optim.lr": lrs, "xbm.weight": (0.5, 1.0)},
    ),
    Arm("fair", "memory_auto_start", {**mem, "xbm.start_step": "auto"}, {"optim.lr": lrs}),
  ]


def _pretrained_arms(lrs, top=(3e-3, 1e-2)):
  """The paper's regime in miniature (`configs/glyphs.py:study,pretrained`): the encoder
  pretrained on 3,390 other kanji (JIS level 2), fine-tuned on 1,200 classes x <= 5
  typefaces with the memory holding the whole train set (6,000), on from step 0.

  An arm whose best lr sat at the top of `lrs` gets the `top` values too, added one at a
  time while the best stayed at the edge (no memory and the averaged term chose 1e-3, then
  3e-3; the summed term peaked inside the grid, at 3e-4)."""
  mem = {"xbm.enabled": True}
  up = {"optim.lr": (*lrs, *top)}
  return [
    Arm(
      "pretrained", "no_memory", {"xbm.enabled": False}, up, x=64, group="contrastive, pretrained"
    ),
    Arm("pretrained", "memory_paper_sum", mem, {"optim.lr": lrs, "xbm.weight": (1.0,)}),
    Arm(
      "pretrained",
      "memory_mean",
      {**mem, "xbm.memory_loss_kwargs.reduction": "mean"},
      {**up, "xbm.weight": (1.0,)},
    ),
  ]


WARM_START = os.path.join(ROOT, "xbm_jax", "data", "glyphs_data", "warm_start_small_cnn32.msgpack")


def _memsize_arms(lr=3e-4):
  """The memory-size curve in the pretrained regime: the averaged memory term (the one
  arm that never hurt) at lr 3e-4, sizes up to the whole train set (6,000); size 0 is the
  no-memory arm. 3e-4 is what every pretrained arm chose on val before the grid gained
  1e-3 (memsize, margin and long ran then); at 400 steps no memory now prefers 1e-3."""
  mean = {"xbm.enabled": True, "xbm.memory_loss_kwargs.reduction": "mean", "optim.lr": lr}
  out = [Arm("memsize", "size_0", {"xbm.enabled": False, "optim.lr": lr}, {}, x=0)]
  for size in (1000, 3000, 6000):
    out.append(Arm("memsize", f"size_{size}", {**mean, "xbm.size": size}, {}, x=size))
  return out


def _margin_arms(lr=3e-4):
  """The pretrained regime with the contrastive margin tuned per arm:
  many glyph negatives sit above cos 0.5, so the summed memory term over 6,000 slots is
  large; a higher margin leaves only the hard negatives active, as on SOP. Both arms get
  the same margin grid at lr 3e-4 (see `_memsize_arms` on that choice)."""
  grid = {"loss.kwargs.margin": (0.5, 0.6, 0.7, 0.8)}
  return [
    Arm("margin", "no_memory", {"xbm.enabled": False, "optim.lr": lr}, grid),
    Arm("margin", "memory_paper_sum", {"xbm.enabled": True, "optim.lr": lr}, grid),
  ]


def _pretrained_batch_arms(lrs=(3e-4, 1e-3, 3e-3)):
  """Item 1 asked in the paper's regime: does a 4x bigger batch (no memory) beat B = 64
  after pretraining? 256 = 64 classes x 4 of the 1,200; the memory holds all 6,000.
  B = 64 is the pretrained stage's no-memory arm (same group in the batch-size plot)."""
  return [
    Arm(
      "pretrained_batch",
      "contrastive_B256",
      {"xbm.enabled": False, "input.batch_size": 256},
      {"optim.lr": lrs},
      x=256,
      group="contrastive, pretrained",
      seeds=(0, 1),
    )
  ]


def _long_arms(lr=3e-4, steps=4000):
  """The training-length question: the pretrained regime for 10x the
  study's 400 steps, memory on from step 0, at lr 3e-4 (see `_memsize_arms`; not re-tuned
  for the long schedule). Val R@1 every 200 steps answers "does the memory's
  early loss turn into a gain later, and when"; test every 1,000 steps, reported at the end."""
  long = {
    "train.steps": steps,
    "optim.lr": lr,
    "evals.val.every_steps": 200,
    "evals.test.every_steps": 1000,
  }
  mem = {**long, "xbm.enabled": True}
  seeds = (0, 1)
  return [
    Arm("long", "no_memory", {**long, "xbm.enabled": False}, {}, seeds=seeds),
    Arm("long", "memory_paper_sum", mem, {}, seeds=seeds),
    Arm(
      "long", "memory_mean", {**mem, "xbm.memory_loss_kwargs.reduction": "mean"}, {}, seeds=seeds
    ),
  ]


def _long8k_arms():
  """The long stage's no-memory and summed-memory runs continued to 8,000 steps (20x):
  at 4,000 the summed term's deficit was still shrinking."""
  return [
    dataclasses.replace(
      a, stage="long8k", fixed={**a.fixed, "train.steps": 8000}, extends=f"long/{a.name}"
    )
    for a in _long_arms()
    if a.name in ("no_memory", "memory_paper_sum")
  ]


def _guard_arms():
  """The drift guard, not a tuned comparison: the warm-start regime (the committed no-memory
  weights, lr 1e-4, 600 steps), memory 8,192 on at step 100 so the guard can measure
  the memory-free drift first; two seeds, test R@1 only (the warm weights saw the val
  classes, so val is not clean here)."""
  warm = {"train.init_from": WARM_START, "train.steps": 600, "optim.lr": 1e-4}
  mem = {**warm, "xbm.enabled": True, "xbm.size": 8192, "xbm.start_step": 100}
  one = {"xbm.weight": (1.0,)}
  return [
    Arm("guard", "no_memory", {**warm, "xbm.enabled": False}, one, seeds=(0, 1)),
    Arm("guard", "memory_paper_sum", mem, one, seeds=(0, 1)),
    Arm(
      "guard", "memory_mean", {**mem, "xbm.memory_loss_kwargs.reduction": "mean"}, one, seeds=(0, 1)
    ),
    Arm("guard", "memory_paper_sum_guard", {**mem, "xbm.guard": True}, one, seeds=(0, 1)),
    # The same arm re-run after "off" became a stop (no enqueue, no memory products).
    Arm("guard", "memory_paper_sum_guard_rerun", {**mem, "xbm.guard": True}, one, seeds=(0, 1)),
  ]


def _pretrained_drift_arms():
  """The drift corrections in the paper's regime in miniature, on the summed memory arm
  at its chosen point (lr 3e-4, weight 1): the fresh-memory oracle (the whole 6,000-slot
  memory re-embedded every 100 of 400 updates: the bound on any staleness fix) and the
  momentum encoder (m = 0.99, the correction that recovered the oracle's gain on the
  testbed)."""
  mem = {"xbm.enabled": True}
  at, pair = "pretrained/memory_paper_sum", "pretrained/memory_paper_sum|pretrained/no_memory"
  return [
    Arm(
      "pretrained_drift",
      "memory_paper_sum_fresh100",
      {**mem, "xbm.refresh_every": 100},
      {},
      baseline=pair,
      at_chosen_of=at,
    ),
    Arm(
      "pretrained_drift",
      "memory_paper_sum_momentum0.99",
      {**mem, "xbm.momentum_encoder": 0.99},
      {},
      baseline=pair,
      at_chosen_of=at,
    ),
  ]


def _paired_guard_arms():
  """The trainer's paired guard (`xbm.guard=paired`) where the ratio guard never fired:
  from scratch, the reference recipe (memory 8,192 from step 300, the summed term), lr
  1e-3, 500 steps, val R@1 every 100; the guard compares each val reading after the
  start with the one at step 300 (alpha 0.01 over 2 readings). Two seeds; its runs
  were not used to design the rule (`xbm_jax/control/paired_guard.py`)."""
  base = {"optim.lr": 1e-3, "train.steps": 500}
  mem = {**base, "xbm.enabled": True}
  guard = {"xbm.guard": "paired", "xbm.guard_metric": "eval/val/recall@1"}
  two = {"seeds": (0, 1)}
  return [
    Arm("guard_paired", "no_memory", {**base, "xbm.enabled": False}, {}, **two),
    Arm("guard_paired", "memory_paper_sum", mem, {}, **two),
    Arm(
      "guard_paired",
      "memory_paper_sum_paired_guard",
      {**mem, **guard},
      {},
      baseline="no_memory|memory_paper_sum",
      **two,
    ),
  ]


def _with_baselines(arms_: list[Arm]) -> list[Arm]:
  """Arms of a stage with a no-memory arm ("no_memory", or memsize's "size_0") and no
  baseline of their own take it as their paired baseline."""
  names = {(a.stage, a.name) for a in arms_}
  out = []
  for a in arms_:
    base = next((b for b in ("no_memory", "size_0") if (a.stage, b) in names), "")
    if not a.baseline and base and a.name != base:
      a = dataclasses.replace(a, baseline=base)
    out.append(a)
  return out


def _in_paper_regime(arms_: list[Arm]) -> list[Arm]:
  """The arms trained in `configs/glyphs.py:study,pretrained`."""
  return [dataclasses.replace(a, variant=PRETRAINED) for a in arms_]


def arms(smoke: bool) -> list[Arm]:
  if smoke:  # two tiny arms: wiring only
    return _with_baselines(
      [
        Arm("smoke", "no_memory", {"xbm.enabled": False}, {"optim.lr": (1e-3,)}),
        Arm("smoke", "memory", {"xbm.enabled": True}, {"optim.lr": (1e-3, 1e-2)}),
        Arm(
          "smoke",
          "no_memory_longer",
          {"xbm.enabled": False, "optim.lr": 1e-3, "train.steps": 8},
          {},
          extends="smoke/no_memory/lr0.001",
        ),
      ]
    )
  # A first grid with 3e-4 (B = 32 / 64 / 128, seed 0) put it last every time and
  # 3e-3 at the top edge: the grid moved up one step.
  lrs = (1e-3, 3e-3, 1e-2)
  return _with_baselines(
    _batch_arms("batch_size", "contrastive", lrs)
    + _fair_arms((1e-3, 3e-3))
    + _guard_arms()
    + _paired_guard_arms()
    + _in_paper_regime(
      # 1e-3 added after 3e-4 won at the grid's top edge for every pretrained arm.
      _pretrained_arms((3e-5, 1e-4, 3e-4, 1e-3))
      + _memsize_arms()
      + _margin_arms()
      + _pretrained_batch_arms()
      + _long_arms()
      + _long8k_arms()
      + _pretrained_drift_arms()
    )
    + _batch_arms("batch_size_ms", "multi_similarity", lrs)
    + study_cjk.arms()
  )
