"""The report on synthetic runs written by MetricWriter: PNGs, table, partial logs."""
import importlib.util
import os

import pytest
from PIL import Image

from xbm_jax.insight import report
from xbm_jax.insight.report import build_report, load_metrics
from xbm_jax.train.writer import MetricWriter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(workdir, label, xbm):
    with MetricWriter(workdir, tensorboard=False) as w:
        w.write_config({"label": label, "xbm": {"size": 800 if xbm else 0}})
        for s in range(10, 101, 10):
            m = {"train/loss": 2.0 - s / 100, "train/loss_batch": 1.0 - s / 200,
                 "train/drift@10": 0.05 / s}
            if xbm:
                m["train/loss_xbm"] = 1.0 - s / 200
                m["train/xbm_weight"] = 1.0
            w.write_scalars(s, m)
            if s % 50 == 0:
                w.write_scalars(s, {"eval/sop/recall@1": s / 200 + 0.1 * xbm,
                                    "eval/sop/recall@10": s / 150})


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
    header = next(line for line in md.splitlines() if line.startswith("| run"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:2] == ["run", "last step"]
    assert "eval/sop/recall@1" in cols and "train/loss_xbm" in cols
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    base, x = rows["baseline"], rows["contrastive + XBM"]
    i = cols.index("eval/sop/recall@1")
    assert (base[1], base[i], x[i]) == ("100", "0.5", "0.6")
    assert base[cols.index("train/loss_xbm")] == "–"


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
        "report_script", os.path.join(ROOT, "scripts", "report.py"))
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
