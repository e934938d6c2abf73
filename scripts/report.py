"""Plots and a Markdown table from training runs' metrics.jsonl.

    python scripts/report.py --workdir runs/base --workdir runs/xbm --out runs/report

writes loss/recall/drift/compare PNGs and report.md (per evaluator: R@1, R@K, MAP@R,
the final loss terms and the training time of each run, labelled XBM or baseline from
its config.json); see xbm_jax/insight/report.py.
"""

import argparse

from xbm_jax.insight.report import build_report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--workdir",
    action="append",
    required=True,
    help="a run folder holding metrics.jsonl (repeat to overlay runs)",
  )
  parser.add_argument("--out", required=True, help="folder for the PNGs and report.md")
  args = parser.parse_args(argv)
  try:
    written = build_report(args.workdir, args.out)
  except FileNotFoundError as e:
    parser.exit(2, f"error: {e}\n")
  for kind, path in written.items():
    print(f"{kind}: {path}")


if __name__ == "__main__":
  main()
