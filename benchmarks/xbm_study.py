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

Stages: the glyph study's in study_glyphs.py, the SOP-shaped testbed's in study_cjk.py
(`--stage all` runs them in order).

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
import study_glyphs  # benchmarks/, next to this script
import study_records
import study_tables
from study_records import MAP, TEST, VAL, Arm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
# What a run's code is: the tree's files under these (dirty = any of them edited).
CODE = ("xbm_jax", "configs", "scripts", "benchmarks/*.py")

arms = study_glyphs.arms  # every arm of both studies


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


def write_table(out: str, chosen: list[Arm]) -> list[dict]:
  """Writes OUT/study.md, OUT/study.json and the plots from the runs on disk."""
  rows = [r for r in (summarize(out, a) for a in chosen) if r is not None]
  os.makedirs(out, exist_ok=True)
  add_paired(rows)
  with open(os.path.join(out, "study.md"), "w") as f:
    f.write(study_tables.table_md(rows))
    paired_md = study_tables.paired_md(rows)
    if paired_md:
      f.write("\n" + paired_md)
  with open(os.path.join(out, "study.json"), "w") as f:
    json.dump([{k: v for k, v in r.items() if k != "curves"} for r in rows], f, indent=1)
  study_tables.plots(out, rows)
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
