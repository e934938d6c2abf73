"""The study's markdown tables and plots, from the rows `xbm_study.summarize` builds."""

from __future__ import annotations

import os

import numpy as np
from study_records import VAL


def mean_std(values) -> str:
  v = np.asarray(values, float)
  return "n/a" if v.size == 0 else f"{v.mean():.4f} ± {v.std(ddof=1) if v.size > 1 else 0:.4f}"


def pm(p: dict | None) -> str:
  return "–" if not p else f"{p['mean']:+.4f} ± {p['std']:.4f}"


def paired_md(rows: list[dict]) -> str:
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
        f"{'yes' if pair['gain'] else 'no'} | {pm(pair['map'])} | {', '.join(r['commits'])} |"
      )
  return "\n".join(lines) + "\n" if len(lines) > 6 else ""


def grid_note(tuning: list[dict], chosen: dict) -> str:
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


def table_md(rows: list[dict]) -> str:
  head = (
    "| stage | arm | chosen (val) | seeds | steps | test R@1 | test R@8 | test MAP@R "
    "| val R@1 | drift@100 | rel_drift@100 | rank_drift@100 | wall s / run |\n|" + "---|" * 13
  )
  lines = [head]
  for r in rows:
    chosen = ", ".join(f"{k.split('.')[-1]}={v:g}" for k, v in r["chosen"].items())
    chosen += grid_note(r["tuning"], r["chosen"])
    lines.append(
      f"| {r['stage']} | {r['arm']} | {chosen} | {r['seeds']} | "
      f"{max(r['steps'], default=0)} | {mean_std(r['test_r1'])} | "
      f"{mean_std(r['test_r8'])} | {mean_std(r['test_map_r'])} | "
      f"{mean_std(r['val_r1'])} | {mean_std(r['drift100'])} | "
      f"{mean_std(r['rel100'])} | {mean_std(r['rank100'])} | "
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


def errorbar(ax, rows: list[dict], **kw) -> None:
  """Test R@1 (mean ± std over seeds) against each row's x."""
  ax.errorbar(
    [r["x"] for r in rows],
    [np.mean(r["test_r1"]) for r in rows],
    yerr=[np.std(r["test_r1"], ddof=1) if len(r["test_r1"]) > 1 else 0 for r in rows],
    marker="o",
    capsize=3,
    **kw,
  )


def memsize_plot(plt, out: str, rows: list[dict]) -> None:
  if not rows:
    return
  rows = sorted(rows, key=lambda r: r["x"])
  fig, ax = plt.subplots(figsize=(6, 4))
  errorbar(ax, rows)
  ax.set(
    xlabel="memory size (0 = no memory; 6,000 = the whole train set)",
    ylabel="test R@1 (mean ± std over seeds)",
    title="pretrained regime, averaged memory term: R@1 vs memory size",
  )
  fig.tight_layout()
  fig.savefig(os.path.join(out, "r1_vs_memory_size.png"), dpi=120)
  plt.close(fig)


def plots(out: str, rows: list[dict]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  memsize_plot(plt, out, [r for r in rows if r["stage"] == "memsize" and r["test_r1"]])
  curve_rows = [r for r in rows if r["x"] is not None and r["test_r1"] and r["stage"] != "memsize"]
  if curve_rows:
    fig, ax = plt.subplots(figsize=(6, 4))
    for group in sorted({r["group"] for r in curve_rows}):
      g = sorted((r for r in curve_rows if r["group"] == group), key=lambda r: r["x"])
      errorbar(ax, g, label=group)
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
