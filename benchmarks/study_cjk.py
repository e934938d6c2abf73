"""The study's arms on the SOP-shaped testbed "cjk" (`configs/cjk.py`, OUT = benchmarks/out/cjk).

Stages:
- cjk: contrastive and multi-similarity, without and with the whole-train-set memory,
  200 steps, lr tuned per arm on val.
- cjk_controls: controls of each loss's memory arm at the lr that arm chose on val: the
  fresh-memory oracle, a delayed start, the summed term's weight (0.3 / 0.1), a cosine
  schedule (with its no-memory twin).
- cjk_drift: the drift corrections on the multi-similarity memory arm.
- cjk_batch: equal images: B = 256 for 50 steps against B = 64 for 200 (12,800 images
  each), with and without the memory, lr tuned on val; smaller batches (B = 16, 32) for
  200 steps with and without the memory.
"""

from __future__ import annotations

from study_records import Arm

CJK = {"config": "cjk.py", "variant": ""}  # configs/cjk.py, the SOP-shaped testbed
LOSS_TAGS = {"contrastive": "contrastive", "multi_similarity": "ms"}
# Each loss's lr grid; contrastive's winner (1e-3) sat at the first grid's low edge, so
# 3e-4 was added below it.
LRS = {"contrastive": (3e-4, 1e-3, 3e-3, 1e-2), "multi_similarity": (1e-3, 3e-3, 1e-2)}
STEPS = 200


def _cjk_arms():
  """Contrastive and multi-similarity, each without and with the memory (the whole train
  set, 50,000 images, filled from the pretrained model at step 0, weight 1), lr tuned per
  arm on val. 200 steps (~2 epochs of the train set at B = 64): what the shared 2 cores
  allowed (a 400-step run took ~30 min there); val R@1 had flattened by step 200 in the
  first 400-step runs."""
  out = []
  for loss, tag in LOSS_TAGS.items():
    base, grid = {"loss.name": loss, "train.steps": STEPS}, {"optim.lr": LRS[loss]}
    other = "contrastive" if tag == "ms" else "ms"
    out += [
      Arm("cjk", f"{tag}_no_memory", {**base, "xbm.enabled": False}, grid, **CJK),
      Arm(
        "cjk",
        f"{tag}_memory",
        {**base, "xbm.enabled": True, "xbm.prefill": True},
        grid,
        # Also against the other loss's no-memory arm: the best baseline of any loss.
        baseline=f"{tag}_no_memory|{other}_no_memory",
        **CJK,
      ),
    ]
  return out


def _controls(loss: str, tag: str) -> list[Arm]:
  """Controls of one loss's memory arm, each at the lr that arm chose on val, paired with
  the no-memory arm (at its own choice) and with the memory arm:
  - fresh100: the memory re-embedded from the current model every 100 updates (the whole
    train set, `xbm.refresh_every`; at update 0 and 100 of 200): no entry older than 100
    updates against up to 200 (a bound on what a staleness fix can give here);
  - start100: the memory switched on at update 100 of 200 (filled from the model then);
  - weight0.3 / weight0.1 / weight0.03: the summed memory term down-weighted;
  - idexcl: the memory term drops an anchor's own older copies (same image id) from its
    positives (`self_exclusion="id"`; by default only pairs of similarity >= 1 - 1e-5
    are dropped, so the anchor's stale copy from the prefill counts as a positive);
  - cosine: the lr decayed to 0 by a cosine (a low-drift end, as the reference's plateau
    decay gives), against its no-memory twin at that arm's lr."""
  at = {"at_chosen_of": f"cjk/{tag}_memory", **CJK}
  pair = f"cjk/{tag}_no_memory|cjk/{tag}_memory"
  pair += "|cjk/contrastive_no_memory" if tag != "contrastive" else ""  # the best baseline
  mem = {"loss.name": loss, "train.steps": STEPS, "xbm.enabled": True, "xbm.prefill": True}
  cos = {"optim.schedule": "cosine"}
  no_mem = {"loss.name": loss, "train.steps": STEPS, "xbm.enabled": False, **cos}
  return [
    Arm(
      "cjk_controls",
      f"{tag}_memory_fresh100",
      {**mem, "xbm.refresh_every": 100},
      {},
      baseline=pair,
      **at,
    ),
    Arm(
      "cjk_controls",
      f"{tag}_memory_start100",
      {**mem, "xbm.start_step": 100},
      {},
      baseline=pair,
      **at,
    ),
    Arm(
      "cjk_controls", f"{tag}_memory_weight0.3", {**mem, "xbm.weight": 0.3}, {}, baseline=pair, **at
    ),
    Arm(
      "cjk_controls", f"{tag}_memory_weight0.1", {**mem, "xbm.weight": 0.1}, {}, baseline=pair, **at
    ),
    Arm(
      "cjk_controls",
      f"{tag}_memory_idexcl",
      {**mem, "xbm.memory_loss_kwargs.self_exclusion": "id"},
      {},
      baseline=pair,
      **at,
    ),
    Arm(
      "cjk_controls",
      f"{tag}_memory_weight0.03",
      {**mem, "xbm.weight": 0.03},
      {},
      baseline=pair,
      **at,
    ),
    Arm(
      "cjk_controls",
      f"{tag}_no_memory_cosine",
      no_mem,
      {},
      baseline=f"cjk/{tag}_no_memory",
      **{**at, "at_chosen_of": f"cjk/{tag}_no_memory"},
    ),
    Arm(
      "cjk_controls",
      f"{tag}_memory_cosine",
      {**mem, **cos},
      {},
      # ... and under cosine too, the best no-memory baseline of any loss.
      baseline=f"{tag}_no_memory_cosine|cjk/{tag}_memory"
      + ("|contrastive_no_memory_cosine" if tag != "contrastive" else ""),
      **at,
    ),
  ]


def _drift_fix_arms(loss="multi_similarity", tag="ms") -> list[Arm]:
  """The drift corrections (`xbm_jax.freshness.moments`, `xbm_jax.freshness.momentum`) on a loss's
  memory arm, at the lr that arm chose on val; each is read against the stale memory
  (its gap to the fresh-memory oracle is what a fix can recover) and no memory:
  - moments: each step the stored rows' per-dimension moments matched to the batch's;
  - momentum0.99: the enqueued batch embedded by an EMA of the parameters (m = 0.99,
    a ~100-update horizon in a 200-update run); momentum0.99_cosine: the same under the
    cosine schedule, against the cosine arms;
  - reprojection: the memory stores pooled backbone features, projected through the
    current head every step (exact for the head's share of the drift)."""
  at = {"at_chosen_of": f"cjk/{tag}_memory", **CJK}
  # ... and the best no-memory baseline of any loss (contrastive's, on this testbed).
  pair = f"cjk/{tag}_memory|cjk/{tag}_no_memory|cjk_controls/{tag}_memory_fresh100"
  pair += "|cjk/contrastive_no_memory" if tag != "contrastive" else ""
  mem = {"loss.name": loss, "train.steps": STEPS, "xbm.enabled": True, "xbm.prefill": True}
  return [
    Arm(
      "cjk_drift",
      f"{tag}_memory_moments",
      {**mem, "xbm.drift_correction": "moments"},
      {},
      baseline=pair,
      **at,
    ),
    Arm(
      "cjk_drift",
      f"{tag}_memory_momentum0.99",
      {**mem, "xbm.momentum_encoder": 0.99},
      {},
      baseline=pair,
      **at,
    ),
    Arm(
      "cjk_drift",
      f"{tag}_memory_momentum0.99_cosine",
      {**mem, "xbm.momentum_encoder": 0.99, "optim.schedule": "cosine"},
      {},
      baseline=f"cjk_controls/{tag}_memory_cosine|cjk_controls/{tag}_no_memory_cosine"
      + "|cjk_controls/contrastive_no_memory_cosine|cjk/contrastive_no_memory",
      **at,
    ),
    Arm(
      "cjk_drift",
      f"{tag}_memory_reprojection",
      {**mem, "xbm.reprojection": True},
      {},
      baseline=pair,
      **at,
    ),
  ]


def _batch_arms(tag="ms", loss="multi_similarity", lrs=(3e-3, 1e-2)):
  """Equal images: B = 256 (64 classes x 4) for 50 steps, the 12,800 images B = 64 sees
  in 200, without and with the memory; lr tuned on val over 3e-3 / 1e-2 for
  multi-similarity (a bigger batch takes a bigger lr; 3e-3 was the B = 64 arms' choice;
  1e-2 not run), contrastive at its B = 64 arms' 1e-3 only."""
  base = {"loss.name": loss, "train.steps": STEPS // 4, "input.batch_size": 256}
  grid = {"optim.lr": lrs}
  return [
    Arm(
      "cjk_batch",
      f"{tag}_no_memory_b256",
      {**base, "xbm.enabled": False},
      grid,
      baseline=f"cjk/{tag}_no_memory",
      **CJK,
    ),
    Arm(
      "cjk_batch",
      f"{tag}_memory_b256",
      {**base, "xbm.enabled": True, "xbm.prefill": True},
      grid,
      baseline=f"{tag}_no_memory_b256|cjk/{tag}_memory",
      **CJK,
    ),
  ]


def _small_batch_arms(loss="multi_similarity", tag="ms", sizes=(16, 32)) -> list[Arm]:
  """Smaller batches against the memory (the paper's Figure 1 reads R@1 against the batch
  size): B = 16 (4 classes x 4) and 32 (8 x 4) for the same 200 steps, without and with
  the whole-train-set memory, each at the lr its B = 64 twin chose on val (not tuned
  apart: the grid would cost 3x)."""
  out = []
  for size in sizes:
    base = {"loss.name": loss, "train.steps": STEPS, "input.batch_size": size}
    out += [
      Arm(
        "cjk_batch",
        f"{tag}_no_memory_b{size}",
        {**base, "xbm.enabled": False},
        {},
        baseline=f"cjk/{tag}_no_memory",
        **{"at_chosen_of": f"cjk/{tag}_no_memory", **CJK},
      ),
      Arm(
        "cjk_batch",
        f"{tag}_memory_b{size}",
        {**base, "xbm.enabled": True, "xbm.prefill": True},
        {},
        baseline=f"{tag}_no_memory_b{size}|cjk/{tag}_memory",
        **{"at_chosen_of": f"cjk/{tag}_memory", **CJK},
      ),
    ]
  return out


def _contrastive_momentum_arm() -> list[Arm]:
  """The momentum encoder (m = 0.99) on the contrastive memory arm: does a slower-moving
  memory rescue the summed contrastive term, or is its harm the term itself (its
  fresh-memory oracle says the latter)?"""
  at = {"at_chosen_of": "cjk/contrastive_memory", **CJK}
  mem = {"loss.name": "contrastive", "train.steps": STEPS, "xbm.enabled": True}
  return [
    Arm(
      "cjk_drift",
      "contrastive_memory_momentum0.99",
      {**mem, "xbm.prefill": True, "xbm.momentum_encoder": 0.99},
      {},
      baseline="cjk/contrastive_memory|cjk/contrastive_no_memory",
      **at,
    )
  ]


def arms() -> list[Arm]:
  return (
    _cjk_arms()
    + _controls("multi_similarity", "ms")
    + _controls("contrastive", "contrastive")
    + _batch_arms()
    + _batch_arms("contrastive", "contrastive", lrs=(1e-3,))
    + _small_batch_arms()
    + _drift_fix_arms()
    + _contrastive_momentum_arm()
  )
