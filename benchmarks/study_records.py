"""The study's run records: one run's directory, or a stage's compact file.

A finished run leaves `OUT/<run>/run.json` (status, wall time, overrides, commit) and
`OUT/<run>/metrics.jsonl` (one row per logged step). `compact` folds every run of a
stage into one file, `OUT/<stage>.runs.jsonl`, one line per run:

    {"run": "<stage>/<arm>/<grid tag>/s<seed>", "record": {run.json}, "metrics": [rows],
     "configs": {"config.json": {...}, ...}}     # the run's resolved config file(s)

and `read_run` reads either form, so the tables rebuild from the compact files alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess

import numpy as np

COMPACT_SUFFIX = ".runs.jsonl"
SEEDS = (0, 1, 2)
# The logged metrics the study reads.
VAL, TEST, MAP = "eval/val/recall@1", "eval/test/recall@1", "eval/test/map@r"
RUN_FILES = ("run.json", "metrics.jsonl")  # and every config*.json (the resolved configs)


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: fixed overrides, a tuning grid ({config key: values}), a plot position."""

  stage: str
  name: str
  fixed: dict
  grid: dict
  x: float | None = None  # e.g. the batch size, for the curve plots
  group: str = ""  # the curve an arm belongs to
  seeds: tuple = SEEDS
  variant: str = "study"  # the `configs/glyphs.py` variant the arm trains with
  # The finished run this arm resumes with more steps: its directory under OUT without
  # the seed ("stage/arm", plus "/grid_tag" for a tuned arm). Under a constant lr resuming
  # is bit-identical to one longer run, so 8k steps cost 4k more.
  extends: str = ""
  config: str = "glyphs.py"  # the file under configs/ (`variant` is its argument)
  # The arm of the same stage this one's paired differences are taken against (same
  # seed, each at its own chosen grid point); "" for none.
  baseline: str = ""
  # "stage/arm": train at that arm's chosen grid point (read from its tuning runs), for
  # controls of a tuned arm; the point joins `fixed` when the arm is resolved.
  at_chosen_of: str = ""


def git_commit(root: str, paths=()) -> dict:
  """{"commit": HEAD's hash, "dirty": tracked files (under `paths`, git pathspecs; all
  if empty) differ from HEAD} of the tree at `root` ("?" / None outside a checkout)."""
  try:
    head = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *paths], cwd=root, check=False)
    return {"commit": head, "dirty": diff.returncode != 0}
  except (OSError, subprocess.CalledProcessError):
    return {"commit": "?", "dirty": None}


def _merge(rec: dict, rows: list[dict]) -> dict:
  """The record with `last` (each metric's last value) and `curves` ([(step, value)])."""
  last, curves = {}, {}
  for row in rows:
    for k, v in row.items():
      if k != "step":
        last[k] = v
        curves.setdefault(k, []).append((row["step"], v))
  return {**rec, "last": last, "curves": curves}


def _configs(workdir: str) -> dict:
  names = sorted(f for f in os.listdir(workdir) if f.startswith("config") and f.endswith(".json"))
  out = {}
  for name in names:
    with open(os.path.join(workdir, name)) as f:
      out[name] = json.load(f)
  return out


def _read_dir(workdir: str) -> tuple[dict, list[dict]] | None:
  path = os.path.join(workdir, "run.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    rec = json.load(f)
  rows = []
  mpath = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(mpath):
    with open(mpath) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  return rec, rows


@functools.lru_cache(maxsize=64)
def _compact_file(path: str, mtime: float) -> dict[str, tuple[dict, list[dict]]]:
  del mtime  # cache key only: a rewritten file is read again
  out = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        entry = json.loads(line)
        out[entry["run"]] = (entry["record"], entry["metrics"], entry.get("configs", {}))
  return out


def read_run(out: str, name: str) -> dict | None:
  """Run `name` ("stage/arm/tag/sN") under `out`: its directory if it has a run.json,
  else its line in `out/<stage>.runs.jsonl`; None when neither exists."""
  found = _read_dir(os.path.join(out, name))
  if found is None:
    path = os.path.join(out, name.split("/")[0] + COMPACT_SUFFIX)
    if os.path.exists(path):
      found = _compact_file(path, os.path.getmtime(path)).get(name)
  return None if found is None else _merge(*found[:2])


def compact(out: str, stage: str, *, prune: bool) -> str:
  """Writes `out/<stage>.runs.jsonl` from the stage's run directories (merged with the
  runs the file already holds; a directory wins); with `prune`, deletes RUN_FILES from
  those directories afterwards. Returns the file's path."""
  path = os.path.join(out, stage + COMPACT_SUFFIX)
  runs = dict(_compact_file(path, os.path.getmtime(path))) if os.path.exists(path) else {}
  dirs = []
  for root, _, files in os.walk(os.path.join(out, stage)):
    if "run.json" in files:
      name = os.path.relpath(root, out).replace(os.sep, "/")
      runs[name] = (*_read_dir(root), _configs(root))
      dirs.append(root)
  if not runs:
    raise ValueError(f"no runs of stage {stage!r} under {out}")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for name in sorted(runs):
      rec, rows, configs = runs[name]
      line = {"run": name, "record": rec, "metrics": rows, "configs": configs}
      f.write(json.dumps(line) + "\n")
  os.replace(tmp, path)
  if prune:
    for d in dirs:
      for fname in [*RUN_FILES, *_configs(d)]:
        if os.path.exists(os.path.join(d, fname)):
          os.remove(os.path.join(d, fname))
  return path


def paired(arm: dict[int, float], base: dict[int, float]) -> dict | None:
  """Per-seed differences arm - base over their common seeds.

  Returns {"seeds": [...], "diffs": [...], "mean", "std" (ddof 1; 0 for one seed),
  "all_positive"}, or None when no seed is shared.
  """
  seeds = sorted(set(arm) & set(base))
  if not seeds:
    return None
  d = np.asarray([arm[s] - base[s] for s in seeds], float)
  return {
    "seeds": seeds,
    "diffs": d.tolist(),
    "mean": float(d.mean()),
    "std": float(d.std(ddof=1)) if d.size > 1 else 0.0,
    "all_positive": bool((d > 0).all()),
  }


def gain_counts(p: dict | None) -> bool:
  """The study's decision rule: >= 3 seeds, positive on every seed, mean > 2 x std."""
  return bool(p and len(p["seeds"]) >= 3 and p["all_positive"] and p["mean"] > 2 * p["std"])
