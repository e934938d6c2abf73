r"""The XBM study: does the memory help on reachable data, measured fairly?

    python benchmarks/xbm_study.py run --out OUT [--stage batch_size|fair|...] [--smoke]
    python benchmarks/xbm_study.py table --out OUT      # OUT/study.md, study.json, *.png

Protocol (Musgrave et al. 2020, "A metric learning reality check"): every arm is tuned on
a validation split carved from the TRAIN classes (`configs/glyphs.py:study`: train on
1,200 train classes, "val" = the other 300), never on test. For each arm, every grid
point (lr, and for the memory arms the weight) runs with seed 0; the point with the best
final val R@1 is then run with the remaining seeds; the table reports mean +- std over
seeds of the TEST R@1 / R@8 / MAP@R at that point. A run that stops on non-finite values
counts as failed (val R@1 = 0) and is listed. Every number in the table is read back from
the runs' metrics.jsonl files; re-running the command skips finished runs.

Stages (each a list of arms; `--stage all` runs them in order):
- batch_size: no memory, B = 32 / 64 / 128 / 256 (K = 4), equal steps, lr tuned per B,
  contrastive loss (and multi-similarity in `batch_size_ms`). "A big batch for the price
  of a small one": if a bigger batch does not beat B = 64, no memory can.
- fair: B = 64 from scratch, memory 8,192 switched on at step 100: no memory; the paper's
  summed memory term; the memory term averaged over its active pairs; the drift-aware
  auto start. lr (and weight) tuned per arm.
- guard: the warm-start regime, memory on at step 100, the drift guard.
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

    python benchmarks/xbm_study.py compact --out OUT --stage S --prune   # OUT/S.runs.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import study_cjk  # benchmarks/, next to this script
import study_records
from study_records import Arm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
VAL, TEST = "eval/val/recall@1", "eval/test/recall@1"
MAP = "eval/test/map@r"
# What a run's code is: the tree's files under these (dirty = any of them edited).
CODE = ("xbm_jax", "configs", "scripts", "benchmarks/*.py")
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


def resolve(out: str, arm: Arm, all_arms: list[Arm]) -> Arm | None:
  """`arm` with its `at_chosen_of` arm's chosen point in `fixed` (None while that arm's
  tuning runs are unfinished); other arms unchanged."""
  if not arm.at_chosen_of:
    return arm
  stage, name = arm.at_chosen_of.split("/")
  parent = next(a for a in all_arms if (a.stage, a.name) == (stage, name))
  row = summarize(out, parent)
  if row is None:
    return None
  return dataclasses.replace(arm, fixed={**arm.fixed, **row["chosen"]})


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


def grid_points(arm: Arm) -> list[dict]:
  keys = sorted(arm.grid)
  return [dict(zip(keys, vals)) for vals in itertools.product(*(arm.grid[k] for k in keys))]


def run_name(arm: Arm, point: dict, seed: int) -> str:
  tag = "_".join(f"{k.split('.')[-1]}{v:g}" for k, v in sorted(point.items()))
  return os.path.join(arm.stage, arm.name, tag, f"s{seed}")


def read_run(out: str, name: str) -> dict | None:
  """The run's record (status, wall time, commit) merged with its logged metrics, from
  its directory or its stage's compact file (study_records)."""
  return study_records.read_run(out, name)


def _fmt(v) -> str:
  return v if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)


def launch(out: str, arm: Arm, point: dict, seed: int, smoke: bool) -> dict:
  """Runs one training (skipped when its run.json exists); returns its record."""
  name = run_name(arm, point, seed)
  workdir = os.path.join(out, name)
  rec = read_run(out, name)
  if rec is not None:
    return rec
  if arm.extends:
    src = os.path.join(out, arm.extends, f"s{seed}")
    if not os.path.exists(os.path.join(src, "run.json")):
      raise RuntimeError(f"{workdir} extends {src}, which has not finished")
    shutil.copytree(src, workdir, ignore=shutil.ignore_patterns("run.json", "*.lock"))
  os.makedirs(workdir, exist_ok=True)
  overrides = {**arm.fixed, **point, "seed": seed}
  if smoke:  # wiring only: a 1,500-image split stands in for the 24,648-image test set
    overrides["evals.test.split"] = "val5"
  variant = ",".join(filter(None, (arm.variant, "smoke" if smoke else "")))
  cmd = [
    sys.executable,
    TRAIN,
    f"--config=configs/{arm.config}" + (f":{variant}" if variant else ""),
    f"--workdir={workdir}",
    "--config.train.progress=False",
  ]
  cmd += [f"--config.{k}={_fmt(v)}" for k, v in overrides.items()]
  commit = study_records.git_commit(ROOT, CODE)  # before the run: the code it ran
  t0 = time.time()
  with open(os.path.join(workdir, "train.log"), "w") as log:
    rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  with open(os.path.join(workdir, "train.log")) as log:
    tail = log.read()[-3000:]
  if rc != 0 and "non-finite" not in tail:
    # A crash is not a result: stop the study rather than record a 0.
    raise RuntimeError(f"{workdir}: train.py exited {rc}:\n{tail}")
  rec = {
    "status": "ok" if rc == 0 else "diverged (non-finite)",
    "wall_s": time.time() - t0,
    "overrides": overrides,
    "cmd": cmd,
    **commit,
  }
  with open(os.path.join(workdir, "run.json.tmp"), "w") as f:
    json.dump(rec, f, indent=1)
  os.replace(os.path.join(workdir, "run.json.tmp"), os.path.join(workdir, "run.json"))
  print(f"{run_name(arm, point, seed)}: {rec['status']} in {rec['wall_s']:.0f} s", flush=True)
  return read_run(out, name)


def val_score(rec: dict) -> float:
  return rec["last"].get(VAL, 0.0) if rec["status"] == "ok" else 0.0


def run_arm(out: str, arm: Arm, smoke: bool, only_seeds=None, tune: bool = True) -> None:
  """Tunes on seed 0 (unless the grid is one point), then runs the chosen point's seeds;
  `only_seeds` restricts the latter (two drivers can split one stage's seeds). With
  `tune=False` no tuning run is started: the seeds run at the best finished point."""
  seeds = arm.seeds[:1] if smoke else arm.seeds
  points = grid_points(arm)
  best = points[0]
  if not tune:
    row = summarize(out, arm)
    if row is None:
      raise RuntimeError(f"{arm.stage}/{arm.name}: no finished tuning run to choose from")
    best = row["chosen"]
  elif len(points) > 1:
    scores = [val_score(launch(out, arm, p, seeds[0], smoke)) for p in points]
    best = points[int(np.argmax(scores))]
  for seed in seeds:
    if only_seeds is None or seed in only_seeds:
      launch(out, arm, best, seed, smoke)


def _mean_std(values) -> str:
  v = np.asarray(values, float)
  return "n/a" if v.size == 0 else f"{v.mean():.4f} ± {v.std(ddof=1) if v.size > 1 else 0:.4f}"


def summarize(out: str, arm: Arm) -> dict | None:
  """The arm's tuning scores, chosen point and per-seed records (None if no tuning run
  has finished). A grid point not run yet is listed as such and the choice is made among
  the finished ones."""
  points = grid_points(arm)
  tuning = [read_run(out, run_name(arm, p, arm.seeds[0])) for p in points]
  done = [(p, r) for p, r in zip(points, tuning) if r is not None]
  if not done:
    return None
  best = done[int(np.argmax([val_score(r) for _, r in done]))][0]
  by_seed = {s: read_run(out, run_name(arm, best, s)) for s in arm.seeds}
  by_seed = {s: r for s, r in by_seed.items() if r is not None and r["status"] == "ok"}
  recs = list(by_seed.values())
  col = lambda key: [r["last"][key] for r in recs if key in r["last"]]
  return {
    "arm": arm.name,
    "stage": arm.stage,
    "x": arm.x,
    "group": arm.group,
    "chosen": best,
    "seeds": len(recs),
    "tuning": [
      {"point": p, "val_r1": val_score(r) if r else None, "status": r["status"] if r else "not run"}
      for p, r in zip(points, tuning)
    ],
    "baseline": arm.baseline,
    "seed_test_r1": {s: r["last"][TEST] for s, r in by_seed.items() if TEST in r["last"]},
    "seed_test_map": {s: r["last"][MAP] for s, r in by_seed.items() if MAP in r["last"]},
    "commits": sorted({_commit(r) for r in recs}),
    "test_r1": col(TEST),
    "test_r8": col("eval/test/recall@8"),
    "test_map_r": col("eval/test/map@r"),
    "val_r1": col(VAL),
    "drift100": col("train/drift@100"),
    "rel100": col("train/rel_drift@100"),
    "rank100": col("train/rank_drift@100"),
    "wall_s": [r["wall_s"] for r in recs],
    "steps": [int(r["curves"]["train/loss"][-1][0]) for r in recs if "train/loss" in r["curves"]],
    "curves": [r["curves"] for r in recs],
  }


def _commit(rec: dict) -> str:
  """A run's commit, short, "+dirty" when its tree had uncommitted changes; "?" for the
  runs recorded before run.json held it."""
  c = rec.get("commit", "?")
  return c if c == "?" else c[:10] + ("+dirty" if rec.get("dirty") else "")


def add_paired(rows: list[dict]) -> None:
  """Each row with a baseline gets `pairs`: for each baseline ("arm" of its stage or
  "stage/arm"; several joined by "|") its per-seed test R@1 and MAP@R minus the baseline
  row's (same seed; study_records.paired) and whether the gain counts (the decision
  rule). `paired` / `gain`: those of the first baseline."""
  by_name = {(r["stage"], r["arm"]): r for r in rows}
  for r in rows:
    r["pairs"] = []
    for name in filter(None, r["baseline"].split("|")):
      stage, _, arm = name.rpartition("/")
      base = by_name.get((stage or r["stage"], arm))
      if base is None:
        continue
      p = study_records.paired(r["seed_test_r1"], base["seed_test_r1"])
      pm = study_records.paired(r["seed_test_map"], base["seed_test_map"])
      r["pairs"].append(
        {"baseline": name, "r1": p, "map": pm, "gain": study_records.gain_counts(p)}
      )
    first = r["pairs"][0] if r["pairs"] else {"r1": None, "gain": False}
    r["paired"], r["gain"] = first["r1"], first["gain"]


def _pm(p: dict | None) -> str:
  return "–" if not p else f"{p['mean']:+.4f} ± {p['std']:.4f}"


def _paired_md(rows: list[dict]) -> str:
  lines = [
    "Paired differences (test R@1, arm minus its baseline, same seed; each at its own",
    "chosen point). A gain counts when it is positive on every seed, its mean exceeds",
    "2x its std, over >= 3 seeds:",
    "",
    "| stage | arm | baseline | seeds | per seed | mean ± std | positive on every seed "
    "| gain counts | MAP@R: mean ± std | commits |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    for pair in r["pairs"]:
      p = pair["r1"]
      if not p:
        continue
      per = " / ".join(f"{d:+.4f}" for d in p["diffs"])
      lines.append(
        f"| {r['stage']} | {r['arm']} | {pair['baseline']} | {len(p['seeds'])} | {per} | "
        f"{p['mean']:+.4f} ± {p['std']:.4f} | {'yes' if p['all_positive'] else 'no'} | "
        f"{'yes' if pair['gain'] else 'no'} | {_pm(pair['map'])} | {', '.join(r['commits'])} |"
      )
  return "\n".join(lines) + "\n" if len(lines) > 6 else ""


def _grid_note(tuning: list[dict], chosen: dict) -> str:
  """ " (k of n run)" when some grid points have not run; " (edge: lr)" naming each key
  whose chosen value is the first or last of its (multi-valued) grid."""
  if len(tuning) < 2:
    return ""
  ran = sum(t["val_r1"] is not None for t in tuning)
  note = f" ({ran} of {len(tuning)} run)" if ran < len(tuning) else ""
  edges = []
  for key, value in chosen.items():
    values = sorted({t["point"][key] for t in tuning})
    if len(values) > 1 and value in (values[0], values[-1]):
      edges.append(key.split(".")[-1])
  return note + (f" (edge: {', '.join(edges)})" if edges else "")


def _table_md(rows: list[dict]) -> str:
  head = (
    "| stage | arm | chosen (val) | seeds | steps | test R@1 | test R@8 | test MAP@R "
    "| val R@1 | drift@100 | rel_drift@100 | rank_drift@100 | wall s / run |\n|" + "---|" * 13
  )
  lines = [head]
  for r in rows:
    chosen = ", ".join(f"{k.split('.')[-1]}={v:g}" for k, v in r["chosen"].items())
    chosen += _grid_note(r["tuning"], r["chosen"])
    lines.append(
      f"| {r['stage']} | {r['arm']} | {chosen} | {r['seeds']} | "
      f"{max(r['steps'], default=0)} | {_mean_std(r['test_r1'])} | "
      f"{_mean_std(r['test_r8'])} | {_mean_std(r['test_map_r'])} | "
      f"{_mean_std(r['val_r1'])} | {_mean_std(r['drift100'])} | "
      f"{_mean_std(r['rel100'])} | {_mean_std(r['rank100'])} | "
      f"{np.mean(r['wall_s']):.0f} |"
    )
  lines += [
    "",
    "Tuning (seed 0, final val R@1):",
    "",
    "| arm | grid point | val R@1 | status |",
    "|---|---|---|---|",
  ]
  for r in rows:
    for t in r["tuning"]:
      pt = ", ".join(f"{k.split('.')[-1]}={v:g}" for k, v in t["point"].items())
      val = "–" if t["val_r1"] is None else f"{t['val_r1']:.4f}"
      lines.append(f"| {r['stage']}/{r['arm']} | {pt} | {val} | {t['status']} |")
  return "\n".join(lines) + "\n"


def _errorbar(ax, rows: list[dict], **kw) -> None:
  """Test R@1 (mean ± std over seeds) against each row's x."""
  ax.errorbar(
    [r["x"] for r in rows],
    [np.mean(r["test_r1"]) for r in rows],
    yerr=[np.std(r["test_r1"], ddof=1) if len(r["test_r1"]) > 1 else 0 for r in rows],
    marker="o",
    capsize=3,
    **kw,
  )


def _memsize_plot(plt, out: str, rows: list[dict]) -> None:
  if not rows:
    return
  rows = sorted(rows, key=lambda r: r["x"])
  fig, ax = plt.subplots(figsize=(6, 4))
  _errorbar(ax, rows)
  ax.set(
    xlabel="memory size (0 = no memory; 6,000 = the whole train set)",
    ylabel="test R@1 (mean ± std over seeds)",
    title="pretrained regime, averaged memory term: R@1 vs memory size",
  )
  fig.tight_layout()
  fig.savefig(os.path.join(out, "r1_vs_memory_size.png"), dpi=120)
  plt.close(fig)


def _plots(out: str, rows: list[dict]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  _memsize_plot(plt, out, [r for r in rows if r["stage"] == "memsize" and r["test_r1"]])
  curve_rows = [r for r in rows if r["x"] is not None and r["test_r1"] and r["stage"] != "memsize"]
  if curve_rows:
    fig, ax = plt.subplots(figsize=(6, 4))
    for group in sorted({r["group"] for r in curve_rows}):
      g = sorted((r for r in curve_rows if r["group"] == group), key=lambda r: r["x"])
      _errorbar(ax, g, label=group)
    ax.set(
      xscale="log",
      xlabel="batch size B (K = 4), lr tuned per B",
      ylabel="test R@1 (mean ± std over seeds)",
      title="R@1 vs batch size, no memory",
    )
    ticks = sorted({r["x"] for r in curve_rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()  # the log axis's own 3x10^1 labels would overprint ours
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "r1_vs_batch.png"), dpi=120)
    plt.close(fig)
  for stage in sorted({r["stage"] for r in rows if r["x"] is None and r["stage"] != "memsize"}):
    g = [r for r in rows if r["stage"] == stage and r["curves"]]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    panels = (
      (VAL, "val R@1 (seed mean)", "R@1"),
      ("train/drift@50", "1 - cos over 50 steps", "cosine drift (old measure)"),
      ("train/rel_drift@50", "mean |change of probe cos|", "relational drift"),
      ("train/rank_drift@50", "share of top-10 changed", "rank drift (the guard's)"),
    )
    for r in g:
      for ax, (key, _, _) in zip(axes, panels):
        series = [c[key] for c in r["curves"] if key in c]
        if series:
          n = min(len(s) for s in series)
          ax.plot(
            [s for s, _ in series[0][:n]],
            np.mean([[v for _, v in s[:n]] for s in series], axis=0),
            label=r["arm"],
          )
    for ax, (_, ylabel, title) in zip(axes, panels):
      ax.set(xlabel="step", ylabel=ylabel, title=f"{stage}: {title}")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{stage}_curves.png"), dpi=120)
    plt.close(fig)


def write_table(out: str, chosen: list[Arm]) -> list[dict]:
  """Writes OUT/study.md, OUT/study.json and the plots from the runs on disk."""
  rows = [r for r in (summarize(out, a) for a in chosen) if r is not None]
  os.makedirs(out, exist_ok=True)
  add_paired(rows)
  with open(os.path.join(out, "study.md"), "w") as f:
    f.write(_table_md(rows))
    paired_md = _paired_md(rows)
    if paired_md:
      f.write("\n" + paired_md)
  with open(os.path.join(out, "study.json"), "w") as f:
    json.dump([{k: v for k, v in r.items() if k != "curves"} for r in rows], f, indent=1)
  _plots(out, rows)
  print(open(os.path.join(out, "study.md")).read())
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("command", choices=("run", "table", "compact"))
  parser.add_argument("--out", required=True)
  parser.add_argument("--stage", default="all", help="a stage, a comma list, or all")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--arms", default="", help="run only these arms (comma list of names)")
  parser.add_argument(
    "--no_more_tuning",
    action="store_true",
    help="run seeds at the best finished tuning point, starting no tuning run",
  )
  parser.add_argument(
    "--point", default="", help="run only this tuning point on seed 0, e.g. optim.lr=0.01"
  )
  parser.add_argument("--seeds", default="", help="run only these seeds, e.g. 0 or 1,2")
  parser.add_argument(
    "--prune", action="store_true", help="compact: delete the run directories' record files"
  )
  args = parser.parse_args(argv)
  stages = args.stage.split(",")
  every = arms(args.smoke)
  chosen = [a for st in stages for a in every if st in ("all", a.stage)]
  if not chosen:
    parser.error(
      f"--stage {args.stage!r} names no arm; stages: {sorted({a.stage for a in arms(args.smoke)})}"
    )
  if args.command == "compact":
    for stage in sorted({a.stage for a in chosen}):
      if os.path.isdir(os.path.join(args.out, stage)):  # stages never run have nothing
        print(study_records.compact(args.out, stage, prune=args.prune))
  if args.command == "run":
    only = {int(x) for x in args.seeds.split(",")} if args.seeds else None
    names = set(filter(None, args.arms.split(",")))
    for arm in (a for a in chosen if not names or a.name in names):
      resolved = resolve(args.out, arm, every)
      if resolved is None:
        sys.exit(f"{arm.stage}/{arm.name}: {arm.at_chosen_of} has not finished its tuning")
      if args.point:  # one tuning run (two drivers can split an arm's grid)
        key, _, value = args.point.partition("=")
        for p in grid_points(resolved):
          if _fmt(p.get(key)) == _fmt(float(value)):
            launch(args.out, resolved, p, resolved.seeds[0], args.smoke)
        continue
      run_arm(args.out, resolved, args.smoke, only, tune=not args.no_more_tuning)
  write_table(args.out, [r for r in (resolve(args.out, a, every) for a in chosen) if r])


if __name__ == "__main__":
  main()
