"""The paired memory guard (`xbm_jax.control.paired_guard`) read on glyph runs it was not fitted to.

Two regimes of the glyph study protocol (`configs/glyphs.py:study`: train on 1,200
classes, read on the 300 held-out "val" classes, 5,069 queries, leave-one-out R@1):

  scratch:    from scratch at lr 1e-3, memory 8,192 from step 300 (the reference
              recipe); arms "mem" and "base" (no memory), trained in stages to 300,
              400 and 500 steps, params exported after each stage;
  pretrained: `study,pretrained` at lr 3e-4, memory 6,000 from step 0, 400 steps;
              arms "pt_none", "pt_sum" (the paper's summed memory term) and
              "pt_mean" (the term averaged over its active pairs).

For every exported model it embeds the val split (eval mode, centre crop 28 of the
32 x 32 glyphs, as the evaluator does), takes the per-query R@1 hits and prints
the verdict of each comparison at alpha = 0.01: a memory arm against the last
memory-free reading and against the memory-free arm at the same step, and the
memory-free arm against its own previous reading (which must never fire).
Training is skipped for exports already in --out. About 25 minutes a seed on 2 CPU cores.

    python benchmarks/guard_check.py --out /tmp/guard_check [--seeds 0,1] [--json FILE]
"""

import argparse
import json
import os
import subprocess
import sys

import jax
import numpy as np

from xbm_jax import models
from xbm_jax.control import paired_guard
from xbm_jax.data import glyphs
from xbm_jax.evaluation import metrics
from xbm_jax.train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRATCH = {"mem": [], "base": ["--config.xbm.enabled=False"]}
PRETRAINED = {
  "pt_none": ["--config.xbm.enabled=False"],
  "pt_sum": [],
  "pt_mean": ["--config.xbm.memory_loss_kwargs.reduction=mean"],
}
# (memory arm, reference, readings of the run it stands for)
COMPARISONS = [
  ("mem_400", "mem_300", 2),  # against the last memory-free reading
  ("mem_500", "mem_300", 2),
  ("mem_400", "base_400", 2),  # against an A/B arm
  ("mem_500", "base_500", 2),
  ("base_400", "base_300", 2),  # no memory against its own earlier reading: never fires
  ("base_500", "base_400", 2),
  ("pt_sum_400", "pt_none_400", 1),
  ("pt_mean_400", "pt_none_400", 1),
]


def seeded(name: str, seed: int) -> str:
  """The run / export name of an arm for a seed ("mem_400" -> "mem_s1_400"; seed 0 bare)."""
  if not seed:
    return name
  arm, _, steps = name.rpartition("_")
  return f"{arm}_s{seed}_{steps}" if steps.isdigit() else f"{name}_s{seed}"


def train(out, name, steps, config, flags):
  """Runs scripts/train.py to `steps` in `out/name` and exports `out/name_steps.msgpack`."""
  export = os.path.join(out, f"{name}_{steps}.msgpack")
  if os.path.exists(export):
    return
  workdir = os.path.join(out, name)
  cmd = [sys.executable, os.path.join(ROOT, "scripts/train.py"), f"--config={config}"]
  cmd += [f"--workdir={workdir}", f"--config.train.steps={steps}"] + flags
  subprocess.run(cmd, check=True, cwd=ROOT)
  checkpoint.export_params(workdir, export)


def val_hits(paths):
  """`{name: [Q] bool}` R@1 hits on the glyph val split, and `{name: R@1}`."""
  val = glyphs.load_arrays("val")
  images = val["images"][:, 2:30, 2:30]  # resize 32 (the size already) -> centre crop 28
  model = models.create({"name": "small_cnn", "embed_dim": 64, "width": 32})
  embed = jax.jit(lambda v, x: model.apply(v, x, train=False))
  hits, recall = {}, {}
  for name, path in paths.items():
    loaded = checkpoint.load_params(path)
    v = {k: loaded[k] for k in checkpoint.PARAM_KEYS}
    emb = np.concatenate(
      [np.asarray(embed(v, images[i : i + 1024])) for i in range(0, len(images), 1024)]
    )
    res = metrics.retrieval_metrics(
      emb, val["labels"], ks=(1,), self_exclude=True, map_at_r=False, per_query=True
    )
    hits[name], recall[name] = (res["rank"] < 1)[res["valid"]], res["recall@1"]
  return hits, recall


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--json", default="")
  p.add_argument("--alpha", type=float, default=0.01)
  p.add_argument("--seeds", default="0")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  seeds = [int(x) for x in args.seeds.split(",")]
  for seed in seeds:
    common = [f"--config.seed={seed}"] if seed else []
    for name, flags in SCRATCH.items():
      for steps in (300, 400, 500):
        scratch_flags = ["--config.train.checkpoint_every=100"] + flags + common
        train(args.out, seeded(name, seed), steps, "configs/glyphs.py:study", scratch_flags)
    for name, flags in PRETRAINED.items():
      pt_flags = ["--config.optim.lr=3e-4", "--config.train.checkpoint_every=400"] + flags + common
      train(args.out, seeded(name, seed), 400, "configs/glyphs.py:study,pretrained", pt_flags)
  pairs = [(seeded(a, s), seeded(r, s), looks) for s in seeds for a, r, looks in COMPARISONS]
  names = sorted({n for c in pairs for n in c[:2]})
  hits, recall = val_hits({n: os.path.join(args.out, f"{n}.msgpack") for n in names})
  rows = []
  for arm, ref, looks in pairs:
    v = paired_guard.verdict(hits[arm], hits[ref], alpha=args.alpha, looks=looks)
    rows.append({"arm": arm, "reference": ref, "looks": looks, **v._asdict()})
    print(
      f"{arm:>15} vs {ref:<15} R@1 {recall[arm]:.4f} vs {recall[ref]:.4f}  "
      f"gains {v.gains:>4} losses {v.losses:>4}  p {v.p_value:.2g}  switch off: {v.switch_off}"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"alpha": args.alpha, "val_recall@1": recall, "verdicts": rows}, f, indent=1)


if __name__ == "__main__":
  main()
