"""Plots and a Markdown table from one or more runs' ``metrics.jsonl``.

    python scripts/report.py --workdir runs/base --workdir runs/xbm --out runs/report

writes into ``--out`` (each only when some run logged the metrics it needs):

* ``loss.png``    train/loss, train/loss_batch, train/loss_xbm over steps;
* ``recall.png``  one panel per evaluator, every ``eval/<name>/recall@K`` over steps;
* ``drift.png``   one panel per ``train/drift@<delta>``;
* ``compare.png`` the runs overlaid on each evaluator's R@1 (XBM vs baseline);
* ``report.md``   per evaluator a narrow table, one row per run: its last R@1, R@K
  (K the second-smallest logged), MAP@R, the final train/loss_batch and
  train/loss_xbm and the training time; then every final value (metric x run).
  Numbers read as written by hand: ``0.8417``, ``24,648``, ``6 min 49 s``.

All runs share each panel (one colour per run). Missing metrics are skipped.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np

from xbm_jax.insight.run_files import CONFIG_FILE, METRICS_FILE

Series = Dict[str, Tuple[np.ndarray, np.ndarray]]  # name -> (steps int64, values f64)
LOSS_NAMES = ("train/loss", "train/loss_batch", "train/loss_xbm")
_RECALL = re.compile(r"^eval/(.+)/recall@(\d+)$")
_DRIFT = re.compile(r"^train/drift@(\d+)$")
_TABLE = re.compile(r"^(eval/.*|train/loss.*|train/drift@.*|train/xbm_.*)$")


def load_metrics(workdir: str) -> Series:
  """Reads ``<workdir>/metrics.jsonl`` into per-metric step/value arrays, sorted by
  step; if a step was logged twice (a replay after a restart) the last line wins.
  Unparsable lines (e.g. cut short by a crash or a full disk, whatever bytes it
  left) are skipped."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {METRICS_FILE} in workdir {workdir!r} ({path})")
  points: Dict[str, Dict[int, float]] = {}
  with open(path, errors="replace") as f:  # a torn line's bytes: replaced, then skipped
    for line in f:
      try:
        rec = json.loads(line)
        step = int(rec.pop("step"))
      except (ValueError, KeyError, TypeError, AttributeError):
        continue
      for name, v in rec.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          points.setdefault(name, {})[step] = float(v)
  out = {}
  for name, pts in points.items():
    steps = np.array(sorted(pts), np.int64)
    out[name] = (steps, np.array([pts[s] for s in steps], np.float64))
  return out


def run_label(workdir: str) -> str:
  """``config.json``'s ``label`` / ``name`` if present, else the folder's name with
  what the config says the run is: ``XBM (memory 8192 from step 300)`` or
  ``baseline (no memory)``, so the legend never relies on how a folder was named."""
  folder = os.path.basename(os.path.normpath(workdir))
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.isfile(path):
    try:
      with open(path) as f:
        cfg = json.load(f)
      for key in ("label", "name", "run_name"):
        if isinstance(cfg.get(key), str) and cfg[key]:
          return cfg[key]
      xbm = cfg.get("xbm") or {}
      if "enabled" in xbm:
        if not xbm["enabled"]:
          return f"{folder}: baseline (no memory)"
        return f"{folder}: XBM (memory {xbm.get('size')} from step {xbm.get('start_step')})"
    except (ValueError, OSError, AttributeError):
      pass
  return folder


Line = Tuple[str, str, str, str, np.ndarray, np.ndarray]  # run, suffix, colour, style, x, y


def _legend_handles(panels) -> List[Tuple[object, str]]:
  """One entry per run (its colour) and, where lines differ by style within a run
  (R@1, R@2, ...), one per style (black): 2 runs x 4 Ks read from 6 entries, not 8."""
  from matplotlib.lines import Line2D

  runs, styles = {}, {}
  for _, lines in panels:
    for run, suffix, colour, style, _, _ in lines:
      runs.setdefault(run, colour)
      if suffix:
        styles.setdefault(suffix.strip(), style)
  handles = [(Line2D([], [], color=c, lw=2), run) for run, c in runs.items()]
  if len(styles) > 1:
    handles += [(Line2D([], [], color="k", ls=ls), name) for name, ls in styles.items()]
  return handles


def _plot(path: str, panels: List[Tuple[str, List[Line]]], ylabel: str) -> bool:
  """Saves `figure(panels)` to `path`; False when no panel has a line."""
  panels = [p for p in panels if p[1]]
  if not panels:
    return False
  import matplotlib.pyplot as plt

  fig = figure(panels, ylabel)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def figure(panels: List[Tuple[str, List[Line]]], ylabel: str):
  """One figure, one panel per ``(title, lines)``; the legend sits below the panels,
  so it never covers a curve."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  handles = _legend_handles(panels)
  ncol = min(len(handles), 3 if len(panels) == 1 else 4)
  legend_rows = -(-len(handles) // ncol)
  legend_h = 0.3 * legend_rows + 0.2  # inches
  width, height = 5.0 * len(panels) + 1.0, 3.8 + legend_h
  fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False)
  for ax, (title, lines) in zip(axes[0], panels):
    for _, _, colour, style, steps, values in lines:
      ax.plot(steps, values, style, color=colour, marker="." if len(steps) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  fig.legend(
    [h for h, _ in handles],
    [label for _, label in handles],
    loc="lower center",
    ncol=ncol,
    fontsize=9,
    frameon=False,
  )
  # Fixed margins: tight_layout doubles the cost of a small figure.
  fig.subplots_adjust(
    left=0.8 / width,
    right=1 - 0.2 / width,
    bottom=(legend_h + 0.5) / height,
    top=1 - 0.35 / height,
    wspace=0.3,
  )
  return fig


def fmt(v) -> str:
  """A number as a person reads it: ``0.8417``, ``24,648``, ``3.5``, ``0.00012``
  (never ``2.465e+04``); ``–`` when missing."""
  if v is None:
    return "–"
  v = float(v)
  if not np.isfinite(v):
    return str(v).replace("nan", "NaN")
  a = abs(v)
  if v == int(v) and a >= 1:
    return f"{int(v):,}"
  if a >= 1000:
    return f"{v:,.0f}"
  if a >= 100:
    return f"{v:,.1f}"
  if a >= 1e-3 or a == 0:
    return f"{v:.4f}"
  return np.format_float_positional(v, precision=2, unique=False, fractional=False, trim="-")


def fmt_seconds(s) -> str:
  """``42.1 s``, ``6 min 49 s``, ``1 h 02 min``; ``–`` when unknown."""
  if s is None or not np.isfinite(s):
    return "–"
  if s < 60:
    return f"{s:.1f} s"
  m, sec = divmod(int(round(s)), 60)
  if m < 60:
    return f"{m} min {sec:02d} s"
  return f"{m // 60} h {m % 60:02d} min"


def train_seconds(series: Series):
  """Seconds spent in training steps, from ``train/steps_per_s`` (each logged value
  covers the steps since the previous log line; evaluation time is not in it)."""
  if "train/steps_per_s" not in series:
    return None
  steps, rate = series["train/steps_per_s"]
  prev = np.concatenate([[0], steps[:-1]])
  ok = rate > 0
  return float(np.sum((steps - prev)[ok] / rate[ok]))


def _last(series: Series, name: str):
  return (int(series[name][0][-1]), float(series[name][1][-1])) if name in series else None


def _eval_table(ev: str, ks, runs) -> List[str]:
  """One row per run: the evaluator's last R@1, R@K, MAP@R with the final loss terms."""
  k = sorted(ks)[1] if len(ks) > 1 else sorted(ks)[0]
  lines = [
    f"## eval/{ev}",
    "",
    f"| run | step | R@1 | R@{k} | MAP@R | loss_batch | loss_xbm | train time |",
    "|---|--:|--:|--:|--:|--:|--:|--:|",
  ]
  for label, series in runs:
    r1, rk, mapr = (_last(series, f"eval/{ev}/{m}") for m in ("recall@1", f"recall@{k}", "map@r"))
    step = next((x[0] for x in (r1, rk, mapr) if x), None)
    lines.append(
      f"| {label} | {fmt(step)} | "
      + " | ".join(fmt(x and x[1]) for x in (r1, rk, mapr))
      + " | "
      + _train_cells(series)
      + " |"
    )
  return lines + [""]


def _train_cells(series: Series) -> str:
  vals = [_last(series, f"train/{n}") for n in ("loss_batch", "loss_xbm")]
  return " | ".join(fmt(v and v[1]) for v in vals) + f" | {fmt_seconds(train_seconds(series))}"


def _markdown(runs, workdirs, recall, written) -> str:
  lines = ["# Run report", ""]
  for ev, ks in sorted(recall.items()):
    lines += _eval_table(ev, [k for k, _ in ks], runs)
  if not recall:
    lines += [
      "## training",
      "",
      "| run | step | loss_batch | loss_xbm | train time |",
      "|---|--:|--:|--:|--:|",
    ]
    for label, series in runs:
      step = max((int(s[0][-1]) for s in series.values() if len(s[0])), default=None)
      lines.append(f"| {label} | {fmt(step)} | {_train_cells(series)} |")
    lines.append("")
  lines += [
    "Final loss terms are the last logged means; train time sums the logged "
    "intervals at train/steps_per_s (evaluation excluded).",
    "",
  ]
  names = sorted({n for _, s in runs for n in s if _TABLE.match(n)})
  lines += [
    "## All final values",
    "",
    "| metric | " + " | ".join(lab for lab, _ in runs) + " |",
    "|---|" + "--:|" * len(runs),
  ]
  for n in names:
    lines.append(
      f"| {n} | " + " | ".join(fmt(s[n][1][-1]) if n in s else "–" for _, s in runs) + " |"
    )
  lines += [
    "",
    "Runs: " + ", ".join(f"`{w}`" for w in workdirs),
    "Plots: " + (", ".join(f"![{k}]({k}.png)" for k in written) or "none (no plottable metrics)"),
  ]
  return "\n".join(lines) + "\n"


def build_report(workdirs: Sequence[str], out: str) -> Dict[str, str]:
  """Writes the plots and ``report.md`` into ``out``; returns ``{kind: path}`` of the
  files written. Raises FileNotFoundError naming a workdir without metrics.jsonl."""
  if not workdirs:
    raise ValueError("build_report needs at least one workdir")
  runs = [(run_label(w), load_metrics(w)) for w in workdirs]
  labels = [lab for lab, _ in runs]
  if len(set(labels)) < len(labels):  # keep legend entries distinct
    runs = [(f"{lab} [{i}]", s) for i, (lab, s) in enumerate(runs)]
  colours = [f"C{i % 10}" for i in range(len(runs))]
  os.makedirs(out, exist_ok=True)
  written = {}

  def panel_lines(pick) -> List[Line]:
    lines = []
    for (label, series), colour in zip(runs, colours):
      for name, suffix, ls in pick(series):
        steps, values = series[name]
        lines.append((label, suffix, colour, ls, steps, values))
    return lines

  names = sorted({n for _, s in runs for n in s})
  recall = {}
  for n in names:
    m = _RECALL.match(n)
    if m:
      recall.setdefault(m.group(1), []).append((int(m.group(2)), n))
  drift = sorted((int(m.group(1)), n) for n in names for m in [_DRIFT.match(n)] if m)
  styles = ["-", "--", ":", "-."]

  plots = {
    "loss": (
      [(n, panel_lines(lambda s, n=n: [(n, "", "-")] if n in s else [])) for n in LOSS_NAMES],
      "loss",
    ),
    "recall": (
      [
        (
          f"eval/{ev}",
          panel_lines(
            lambda s, ks=ks: [
              (n, f" R@{k}", styles[i % 4]) for i, (k, n) in enumerate(sorted(ks)) if n in s
            ]
          ),
        )
        for ev, ks in sorted(recall.items())
      ],
      "recall",
    ),
    "drift": (
      [(n, panel_lines(lambda s, n=n: [(n, "", "-")] if n in s else [])) for _, n in drift],
      "mean 1 - cos",
    ),
    "compare": (
      [
        (
          f"eval/{ev}/recall@{min(ks)[0]}",
          panel_lines(lambda s, n=min(ks)[1]: [(n, "", "-")] if n in s else []),
        )
        for ev, ks in sorted(recall.items())
      ],
      "recall",
    ),
  }
  for kind, (panels, ylabel) in plots.items():
    path = os.path.join(out, f"{kind}.png")
    if _plot(path, panels, ylabel):
      written[kind] = path

  md = os.path.join(out, "report.md")
  with open(md, "w") as f:
    f.write(_markdown(runs, workdirs, recall, written))
  written["table"] = md
  return written
