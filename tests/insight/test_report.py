"""The report on synthetic runs written by MetricWriter: PNGs, table, partial logs."""

import importlib.util
import json
import os
import re

import pytest
from PIL import Image

from xbm_jax.insight import report
from xbm_jax.insight.report import build_report, load_metrics
from xbm_jax.train.metrics_writer import MetricWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(workdir, label, xbm):
  with MetricWriter(workdir, tensorboard=False) as w:
    w.write_config({"label": label, "xbm": {"size": 800 if xbm else 0}})
    for s in range(10, 101, 10):
      m = {
        "train/loss": 2.0 - s / 100,
        "train/loss_batch": 1.0 - s / 200,
        "train/drift@10": 0.05 / s,
      }
      if xbm:
        m["train/loss_xbm"] = 1.0 - s / 200
        m["train/xbm_weight"] = 1.0
      w.write_scalars(s, m)
      if s % 50 == 0:
        w.write_scalars(
          s, {"eval/sop/recall@1": s / 200 + 0.1 * xbm, "eval/sop/recall@10": s / 150}
        )


def test_report_on_two_runs(tmp_path):
  a, b, out = (str(tmp_path / n) for n in ("base", "xbm", "report"))
  _run(a, "baseline", xbm=False)
  _run(b, "contrastive + XBM", xbm=True)
  m = load_metrics(b)
  assert m["eval/sop/recall@1"][0].tolist() == [50, 100]
  assert m["eval/sop/recall@1"][1] == pytest.approx([0.35, 0.6])

  written = build_report([a, b], out)
  assert set(written) == {"loss", "recall", "drift", "compare", "table"}
  for kind in ("loss", "recall", "drift", "compare"):
    with Image.open(os.path.join(out, f"{kind}.png")) as im:
      assert im.size[0] > 100 and im.size[1] > 100
  with open(os.path.join(out, "report.md")) as f:
    md = f.read()
  assert "| baseline | 100 | 0.5000 | 0.6667 | – | 0.5000 | – |" in md
  assert "| contrastive + XBM | 100 | 0.6000 | 0.6667 | – | 0.5000 | 0.5000 |" in md
  assert "| eval/sop/recall@1 | 0.5000 | 0.6000 |" in md  # every final value


def _write(workdir, lines, config):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write("\n".join(json.dumps(r) for r in lines) + "\n")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)


def test_report_md_is_a_narrow_table_of_readable_numbers(tmp_path):
  """Hand-made logs: the row a person reads, not 2.465e+04 in a 30-column table."""
  train = lambda s, rate, xbm: {
    "step": s,
    "train/loss": 1.23456,
    "train/loss_batch": 0.61234,
    "train/steps_per_s": rate,
    "train/memory_fill": 1.0,
    **({"train/loss_xbm": 0.62222} if xbm else {}),
  }
  ev = {
    "step": 200,
    "eval/sop/recall@1": 0.84172,
    "eval/sop/recall@10": 0.93,
    "eval/sop/recall@100": 0.99,
    "eval/sop/map@r": 0.41234,
    "eval/sop/num_queries": 24648.0,
  }
  xbm = {"xbm": {"enabled": True, "size": 8192, "start_step": 300}}
  _write(str(tmp_path / "x"), [train(100, 2.0, True), train(200, 0.25, True), ev], xbm)
  _write(
    str(tmp_path / "b"),
    [train(100, 2.0, False), train(200, 0.25, False), {**ev, "eval/sop/recall@1": 0.8}],
    {"xbm": {"enabled": False}},
  )
  build_report([str(tmp_path / "x"), str(tmp_path / "b")], str(tmp_path / "r"))
  with open(str(tmp_path / "r" / "report.md")) as f:
    md = f.read()
  table = md[md.index("## eval/sop") : md.index("## All final values")]
  rows = [line for line in table.splitlines() if line.startswith("|")]
  assert rows[0] == ("| run | step | R@1 | R@10 | MAP@R | loss_batch | loss_xbm | train time |")
  # 100 steps at 2/s + 100 steps at 0.25/s = 450 s
  assert rows[2] == (
    "| x: XBM (memory 8192 from step 300) | 200 | 0.8417 | 0.9300 "
    "| 0.4123 | 0.6123 | 0.6222 | 7 min 30 s |"
  )
  assert rows[3] == (
    "| b: baseline (no memory) | 200 | 0.8000 | 0.9300 | 0.4123 | 0.6123 | – | 7 min 30 s |"
  )
  assert "| eval/sop/num_queries | 24,648 | 24,648 |" in md
  assert not re.search(r"\de[+-]\d", md)


@pytest.mark.parametrize(
  "value,text",
  [
    (24648.0, "24,648"),
    (24648.3, "24,648"),
    (0.84172, "0.8417"),
    (1.5, "1.5000"),
    (123.456, "123.5"),
    (1.2e-5, "0.000012"),
    (0.0, "0.0000"),
    (float("nan"), "NaN"),
    (None, "–"),
  ],
)
def test_numbers_read_as_written_by_hand(value, text):
  assert report.fmt(value) == text


def test_seconds_read_as_a_duration():
  assert [report.fmt_seconds(s) for s in (42.14, 409, 3723, None)] == [
    "42.1 s",
    "6 min 49 s",
    "1 h 02 min",
    "–",
  ]


def test_partial_log_and_missing_workdir(tmp_path):
  wd = str(tmp_path / "partial")
  with MetricWriter(wd, tensorboard=False) as w:
    w.write_scalars(1, {"train/loss": 3.0})
  written = build_report([wd], str(tmp_path / "out"))
  assert set(written) == {"loss", "table"}
  with pytest.raises(FileNotFoundError, match="nowhere"):
    build_report([wd, str(tmp_path / "nowhere")], str(tmp_path / "out2"))


def test_script_names_the_missing_workdir(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location(
    "report_script", os.path.join(ROOT, "scripts", "report.py")
  )
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  with pytest.raises(SystemExit) as exc:
    script.main(["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
  assert exc.value.code == 2
  err = capsys.readouterr().err
  assert "nope" in err and "metrics.jsonl" in err


def test_legend_says_which_run_is_xbm_and_which_the_baseline(tmp_path):
  """From the config, not the folder name: two folders named alike stay distinct."""
  for name, enabled in (("run_a", True), ("run_b", False)):
    with MetricWriter(str(tmp_path / name)) as w:
      w.write_config({"xbm": {"enabled": enabled, "size": 8192, "start_step": 300}})
  assert report.run_label(str(tmp_path / "run_a")) == "run_a: XBM (memory 8192 from step 300)"
  assert report.run_label(str(tmp_path / "run_b")) == "run_b: baseline (no memory)"


def test_the_legend_sits_below_every_panel_and_names_runs_and_ks_once():
  """2 runs x R@1/2/4/8 read from 6 legend entries (runs by colour, K by style), drawn
  in the figure's margin below the panels' axes and labels, not over the curves."""
  import numpy as np

  steps = np.array([100, 200, 300])
  lines = [
    (run, f" R@{k}", colour, ls, steps, np.array([0.1, 0.2, 0.3]) * k)
    for run, colour in (("xbm", "C0"), ("base", "C1"))
    for k, ls in zip((1, 2, 4, 8), ("-", "--", ":", "-."))
  ]
  fig = report.figure([("eval/a", lines), ("eval/b", lines[:4])], "recall")
  (legend,) = fig.legends
  assert [t.get_text() for t in legend.get_texts()] == ["xbm", "base", "R@1", "R@2", "R@4", "R@8"]
  assert min(t.get_fontsize() for t in legend.get_texts()) >= 9
  renderer = fig.canvas.get_renderer()
  top = legend.get_window_extent(renderer).y1
  for ax in fig.axes:
    assert top < ax.get_tightbbox(renderer).y0  # below the x labels too
