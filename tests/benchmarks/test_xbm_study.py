"""The study driver end to end on two tiny arms: runs, tuning choice, table."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _last(workdir, key):
  value = None
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      value = json.loads(line).get(key, value)
  return value


@pytest.mark.slow
def test_smoke_study_tunes_on_val_and_tabulates_test(tmp_path):
  out = str(tmp_path / "study")
  # The runs are processes of their own: one CPU device (not the suite's 8 fake ones)
  # and the suite's persistent compilation cache.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"))
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
    "--xla_force_host_platform_device_count=8", ""
  )
  subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "benchmarks", "xbm_study.py"),
      "run",
      "--out",
      out,
      "--smoke",
    ],
    check=True,
    cwd=ROOT,
    capture_output=True,
    env=env,
  )
  rows = {r["arm"]: r for r in json.load(open(os.path.join(out, "study.json")))}
  assert set(rows) == {"no_memory", "memory", "no_memory_longer"}
  # The memory arm's choice is the grid point with the higher final val R@1, read
  # here straight from the two runs' logs.
  runs = {lr: os.path.join(out, "smoke", "memory", f"lr{lr}", "s0") for lr in ("0.001", "0.01")}
  val = {lr: _last(w, "eval/val/recall@1") for lr, w in runs.items()}
  best = max(val, key=val.get)
  assert rows["memory"]["chosen"] == {"optim.lr": float(best)}
  assert rows["memory"]["test_r1"] == [_last(runs[best], "eval/test/recall@1")]
  # The memory runs really used the memory; the baseline did not.
  assert _last(runs[best], "train/memory_fill") > 0
  base = os.path.join(out, "smoke", "no_memory", "lr0.001", "s0")
  assert _last(base, "train/loss_xbm") == 0.0
  table = open(os.path.join(out, "study.md")).read()
  assert f"| smoke | memory | lr={float(best):g} (edge: lr) | 1 |" in table  # a 2-point grid
  # The extending arm resumed the 6-step baseline (its log begins with the source's
  # lines) and went on to 8 steps.
  longer = os.path.join(out, "smoke", "no_memory_longer", "s0")
  with open(os.path.join(base, "metrics.jsonl")) as f:
    source_lines = f.read().splitlines()
  with open(os.path.join(longer, "metrics.jsonl")) as f:
    longer_lines = f.read().splitlines()
  assert longer_lines[: len(source_lines)] == source_lines
  assert json.loads(longer_lines[-1])["step"] == 8
  assert "resuming step 6" in open(os.path.join(longer, "train.log")).read()
  # Each run records the commit of the code it ran; the memory arm is paired with the
  # no-memory arm (same seed): its difference is the two runs' test R@1 difference.
  head = subprocess.run(
    ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
  ).stdout.strip()
  rec = json.load(open(os.path.join(runs[best], "run.json")))
  assert rec["commit"] == head and isinstance(rec["dirty"], bool)
  diff = _last(runs[best], "eval/test/recall@1") - _last(base, "eval/test/recall@1")
  assert rows["memory"]["paired"]["diffs"] == pytest.approx([diff])
  assert "| smoke | memory | no_memory | 1 |" in open(os.path.join(out, "study.md")).read()
  # Compacted, the stage's runs live in one file and the table rebuilds identically.
  table_before = open(os.path.join(out, "study.md")).read()
  script = os.path.join(ROOT, "benchmarks", "xbm_study.py")
  for cmd in (["compact", "--prune"], ["table"]):
    subprocess.run(
      [sys.executable, script, cmd[0], "--out", out, "--smoke", *cmd[1:]],
      check=True,
      cwd=ROOT,
      capture_output=True,
      env=env,
    )
  assert not os.path.exists(os.path.join(runs[best], "run.json"))
  assert os.path.isfile(os.path.join(out, "smoke.runs.jsonl"))
  assert open(os.path.join(out, "study.md")).read() == table_before
