"""The docs' numbers and commands against the code: the glyph demo's figures (README,
docs/training.md, docs/results.md and configs/glyphs.py) are those of the committed run
they cite, and docs/training.md's "Your own data" commands run as written on a tiny
list-file dataset (~30 s: two subprocesses, one of them a 6-step training)."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import fakes
from tests.helpers.docs import doc_section, section_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "benchmarks", "out", "demo")


def demo_run(name: str) -> tuple[dict, dict]:
  """(run.json, {metric: {step: value}}) of a committed demo run."""
  with open(os.path.join(DEMO, name, "run.json")) as f:
    run = json.load(f)
  series = {}
  with open(os.path.join(DEMO, name, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      for k, v in rec.items():
        series.setdefault(k, {})[rec["step"]] = v
  return run, series


def quoted_recalls(text: str) -> list[tuple[str, str]]:
  """Every `R@k 0.dddd` in `text`."""
  return re.findall(r"R@(\d+) (0\.\d{4})\b", text)


def test_the_demo_figures_are_the_committed_runs():
  runs = {name: demo_run(name) for name in ("xbm", "base")}
  final = {}
  logged = set()  # every ("k", "0.dddd") the two runs logged at an evaluation
  for name, (run, series) in runs.items():
    r1 = series["eval/glyphs/recall@1"]
    assert run["final"]["eval/glyphs/recall@1"] == r1[1200] and run["final_step"] == 1200
    final[name] = f"{r1[1200]:.4f}"
    for key, values in series.items():
      m = re.fullmatch(r"eval/glyphs/recall@(\d+)", key)
      logged |= {(m.group(1), f"{v:.4f}") for v in values.values()} if m else set()
  assert runs["xbm"][0]["commit"] == runs["base"][0]["commit"]
  commit = runs["xbm"][0]["commit"][:7]
  assert runs["base"][0]["cmd"][-1] == "--config.xbm.enabled=False"

  import configs.glyphs  # pylint: disable=g-import-not-at-top

  for where, text in [
    ("configs/glyphs.py", configs.glyphs.__doc__),
    ("README Train", doc_section("README.md", "Train")),
    ("docs/training.md Training", doc_section("docs/training.md", "Training")),
    ("docs/results.md Results", doc_section("docs/results.md", "Results: the glyph demo")),
  ]:
    assert commit in text, where
    for name in ("xbm", "base"):
      assert re.search(rf"R@1 (\*\*)?{final[name]}\b", text) or f"**{final[name]}**" in text, (
        where,
        name,
      )
    stale = [q for q in quoted_recalls(text) if q not in logged]
    assert not stale, (where, stale)


def test_the_demo_table_is_the_committed_runs():
  rows = [
    r
    for r in doc_section("docs/results.md", "Results: the glyph demo").splitlines()
    if r.startswith("| ")
  ]
  for name, marker in (("xbm", "with memory"), ("base", "without")):
    _, series = demo_run(name)
    (row,) = [r for r in rows if r.startswith(f"| {marker}")]
    cells = [c.strip().replace("*", "") for c in row.strip("|").split("|")]
    r1 = series["eval/glyphs/recall@1"]
    assert cells[1] == " / ".join(f"{r1[s]:.4f}" for s in (400, 800, 1200))
    assert cells[2] == f"{series['eval/glyphs/recall@8'][1200]:.4f}"
    assert cells[3] == f"{series['eval/glyphs/map@r'][1200]:.4f}"
    batch, xbm = series["train/loss_batch"][1200], series["train/loss_xbm"][1200]
    assert cells[4] == f"{batch:.2f} / " + (f"{xbm:.2f}" if xbm else "–")
    drift, rank = series["train/drift@100"][1100], series["train/rank_drift@100"][1100]
    assert cells[5] == f"{drift:.3f} / {rank:.3f}"


def test_the_commit_cited_is_in_this_history():
  commit = demo_run("xbm")[0]["commit"]
  out = subprocess.run(
    ["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=ROOT, capture_output=True
  )
  if out.returncode not in (0, 1):
    pytest.skip(f"no git history here ({out.stderr.decode().strip()})")
  assert out.returncode == 0, f"{commit} is not an ancestor of HEAD"


def own_data_commands() -> list[str]:
  return section_commands("docs/training.md", "Your own data")


@pytest.mark.slow
def test_your_own_data_commands_run_as_written(tmp_path):
  manual, data = tmp_path / "mydata", tmp_path / "tfds"
  fakes.listfile(str(manual), {"train": {c: 5 for c in range(8)}, "test": {20: 4, 21: 4}})
  prepare, smoke, convert, train = own_data_commands()
  assert "convert_weights.py" in convert and "custom.py:name=mydata " in train
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  outs = []
  for command in (prepare, smoke):
    command = command.replace("~/mydata", str(manual)).replace("~/tfds", str(data))
    command = command.replace("/tmp/mydata_smoke", str(tmp_path / "run"))
    args = [sys.executable if a == "python" else a for a in shlex.split(command)]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (command, out.stderr[-3000:])
    outs.append(out.stdout)
  assert "reading test <- test.txt, train <- train.txt" in outs[0]
  assert "{'test': 8, 'train': 40}" in outs[0]
  assert re.search(r"^eval/mydata/recall@1 = 0\.\d{4}$", outs[1], re.M), outs[1]
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "last")


def test_the_readme_search_commands_are_the_tested_ones():
  """The README's search commands are lines of docs/search.md's block, which
  tests/inference/test_docs.py runs as written."""
  readme = section_commands("README.md", "Search with your model")
  tested = section_commands("docs/search.md", "Train, embed, search, threshold")
  assert readme and set(readme) <= set(tested), set(readme) - set(tested)
