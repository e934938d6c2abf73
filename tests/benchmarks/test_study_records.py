"""The study's records: compact files, paired differences, the decision rule, commits."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import study_records  # noqa: E402  pylint: disable=g-import-not-at-top


def _write_run(out, name, rec, rows):
  d = os.path.join(out, name)
  os.makedirs(d)
  json.dump(rec, open(os.path.join(d, "run.json"), "w"))
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  json.dump({"seed": 0}, open(os.path.join(d, "config.json"), "w"))


def test_compact_keeps_every_record_and_prunes_the_directories(tmp_path):
  out = str(tmp_path)
  runs = {
    "st/a/lr0.1/s0": (
      {"status": "ok", "wall_s": 3.0},
      [{"step": 1, "x": 1.0}, {"step": 2, "x": 0.5, "y": 7}],
    ),
    "st/b/s1": ({"status": "diverged (non-finite)", "wall_s": 1.0}, []),
  }
  for name, (rec, rows) in runs.items():
    _write_run(out, name, rec, rows)
  _write_run(out, "other/a/s0", {"status": "ok"}, [{"step": 1, "x": 2.0}])
  before = {n: study_records.read_run(out, n) for n in runs}
  assert before["st/a/lr0.1/s0"]["last"] == {"x": 0.5, "y": 7}
  assert before["st/a/lr0.1/s0"]["curves"]["x"] == [(1, 1.0), (2, 0.5)]
  path = study_records.compact(out, "st", prune=True)
  assert path == os.path.join(out, "st.runs.jsonl")
  lines = [json.loads(line) for line in open(path)]
  assert [e["run"] for e in lines] == sorted(runs)
  assert all(e["configs"] == {"config.json": {"seed": 0}} for e in lines)
  for name in runs:
    assert not os.listdir(os.path.join(out, name))  # run.json, metrics, config gone
    after = study_records.read_run(out, name)
    assert json.loads(json.dumps(after)) == json.loads(json.dumps(before[name]))
  assert study_records.read_run(out, "other/a/s0")["last"] == {"x": 2.0}  # untouched
  assert study_records.read_run(out, "st/a/lr0.1/s9") is None
  # A second compaction merges new runs into the file.
  _write_run(out, "st/c/s0", {"status": "ok"}, [{"step": 1, "x": 3.0}])
  study_records.compact(out, "st", prune=False)
  assert len(open(path).readlines()) == 3
  with pytest.raises(ValueError, match="no runs of stage 'nope'"):
    study_records.compact(out, "nope", prune=False)


def test_paired_differences_and_the_decision_rule():
  p = study_records.paired({0: 0.5, 1: 0.6, 2: 0.7, 3: 0.9}, {0: 0.4, 1: 0.55, 2: 0.5})
  assert p["seeds"] == [0, 1, 2]
  assert p["diffs"] == pytest.approx([0.1, 0.05, 0.2])
  assert p["mean"] == pytest.approx(0.35 / 3)
  m = 0.35 / 3
  std = (((0.1 - m) ** 2 + (0.05 - m) ** 2 + (0.2 - m) ** 2) / 2) ** 0.5
  assert p["std"] == pytest.approx(std) and p["all_positive"]
  assert not study_records.gain_counts(p)  # positive on every seed, but 0.117 < 2 x 0.076
  clean = study_records.paired({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.4, 1: 0.48, 2: 0.59})
  assert study_records.gain_counts(clean)  # 0.11 > 2 x 0.01
  two = study_records.paired({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.5})
  assert not study_records.gain_counts(two)  # < 3 seeds
  neg = study_records.paired({0: 0.5, 1: 0.6, 2: 0.3}, {0: 0.4, 1: 0.5, 2: 0.31})
  assert not neg["all_positive"] and not study_records.gain_counts(neg)
  assert study_records.paired({0: 1.0}, {1: 1.0}) is None


def test_git_commit_names_head_and_whether_tracked_files_changed(tmp_path):
  env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t")
  env["GIT_COMMITTER_EMAIL"] = "t@t"
  git = lambda *a: subprocess.run(
    ["git", *a], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
  ).stdout.strip()
  git("init", "-q")
  (tmp_path / "f.txt").write_text("a")
  git("add", "f.txt")
  git("commit", "-q", "-m", "one")
  head = git("log", "-1", "--format=%H")
  assert study_records.git_commit(str(tmp_path)) == {"commit": head, "dirty": False}
  (tmp_path / "new.txt").write_text("untracked")  # not part of the code a run used
  assert study_records.git_commit(str(tmp_path))["dirty"] is False
  (tmp_path / "f.txt").write_text("b")
  assert study_records.git_commit(str(tmp_path)) == {"commit": head, "dirty": True}
  assert study_records.git_commit(str(tmp_path), ("src",))["dirty"] is False  # f.txt not code
  assert study_records.git_commit(str(tmp_path / "nowhere"))["commit"] == "?"
