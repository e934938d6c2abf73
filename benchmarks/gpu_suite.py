r"""Everything the GPU must show, in one call, as one table.

    python benchmarks/gpu_suite.py                 # on the device, ~5-8 min on one H100
    python benchmarks/gpu_suite.py --smoke         # tiny sizes: the wiring, on CPU (~1 min)
    python benchmarks/gpu_suite.py --smoke --record-reference   # CPU glyph losses -> json

Sections (each runs on its own: one that fails prints FAILED and the rest go on):
  env        device name, backend, JAX and every package version it ran with (the
             device brings its own JAX; our pins are not required);
  train_step ResNet-50 224x224 bf16 train step, B=64, images/s with the 55k memory
             active and without (one compiled step; memory overhead ratio);
  loss_mem   enqueue + L(B,B) + L(B,M) fwd/bwd vs the two-product floor, M=55k/1M/4M
             (benchmarks/loss_memory.py);
  retrieval  leave-one-out R@1/10/100/1000 + MAP@R at 60,502 x 128 (SOP) and 1M x 128:
             seconds (exact, the blockwise path of xbm_jax.evaluation.metrics);
  glyphs     a short glyph run (small CNN, float32); its first losses against the
             values recorded on CPU (benchmarks/out/gpu_suite_reference.json).
Timings are best-of-n, alternated where two things are compared.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import tempfile
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

REFERENCE = os.path.join(ROOT, "benchmarks", "out", "gpu_suite_reference.json")
PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "grain",
  "ml_collections",
  "numpy",
  "pillow",
  "tensorflow-datasets",
)
FULL = dict(
  model="resnet50",
  image=224,
  batch=64,
  dtype="bfloat16",
  memory=55_000,
  steps=10,
  loss_sizes=(55_000, 1_000_000, 4_000_000),
  loss_iters=10,
  retrieval=((60_502, 11_316, True), (1_000_000, 187_000, True)),
  glyph_steps=8,
)
SMOKE = dict(
  model="small_cnn",
  image=28,
  batch=16,
  dtype="auto",
  memory=256,
  steps=2,
  loss_sizes=(1_000, 4_000),
  loss_iters=2,
  retrieval=((2_000, 400, True), (4_000, 800, False)),
  glyph_steps=8,
)


def env(sz, rows):
  dev = jax.devices()[0]
  rows.append(("device", f"{dev.device_kind} x{jax.device_count()}", jax.default_backend()))
  vers = []
  for p in PACKAGES:
    try:
      vers.append(f"{p} {importlib.metadata.version(p)}")
    except importlib.metadata.PackageNotFoundError:
      vers.append(f"{p} -")
  rows.append(("versions", ", ".join(vers[:2]), "; ".join(vers[2:])))


def train_step(sz, rows):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from xbm_jax import memory, models, parallel  # pylint: disable=g-import-not-at-top
  from xbm_jax.cross_batch import CrossBatchMemory  # pylint: disable=g-import-not-at-top
  from xbm_jax.train import optim, state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh(1)
  mcfg = models.default_config()
  mcfg.update(name=sz["model"], embed_dim=128, dtype=sz["dtype"])
  model = models.create(mcfg, axis_name=parallel.DATA_AXIS)
  ch = 1 if sz["model"] == "small_cnn" else 3
  variables = jax.tree.map(
    np.asarray,
    models.init_variables(model, jax.random.PRNGKey(0), image_size=sz["image"], channels=ch),
  )
  ocfg = ml_collections.ConfigDict(
    dict(name="adam", lr=1e-4, weight_decay=5e-4, b1=0.9, b2=0.999, eps=1e-8, schedule="constant")
  )
  direction = optim.make_direction(ocfg)
  step_fn = step_lib.make_train_step(
    model=model,
    direction=direction,
    schedule=optim.make_schedule(ocfg, 1),
    xbm=CrossBatchMemory(size=sz["memory"], dim=128, data_axis=parallel.DATA_AXIS),
    mesh=mesh,
  )
  rng = np.random.default_rng(0)
  b = sz["batch"]
  batch = parallel.global_batch(
    {
      "image": rng.integers(0, 256, (b, sz["image"], sz["image"], ch), dtype=np.uint8),
      "label": np.repeat(np.arange(b // 4), 4).astype(np.int32),
    },
    mesh,
  )
  runs = {}
  for label, start in (("no memory", 2**31 - 1), ("memory", 0)):
    st = state_lib.create(
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      tx=direction,
      memory=memory.init(size=sz["memory"], dim=128),
    )
    st = jax.device_put(st, step_lib.state_shardings(st, mesh))
    ctrl = {
      "start_step": jnp.int32(start),
      "xbm_weight": jnp.float32(1.0),
      "lr_scale": jnp.float32(1.0),
    }
    st, m = step_fn(st, batch, ctrl)
    jax.block_until_ready(m)
    runs[label] = [st, ctrl]
  best = {k: float("inf") for k in runs}
  for _ in range(sz["steps"]):
    for label, run in runs.items():  # alternated: noise hits both alike
      t = time.perf_counter()
      run[0], m = step_fn(run[0], batch, run[1])
      jax.block_until_ready(m)
      best[label] = min(best[label], time.perf_counter() - t)
  what = f"{sz['model']} {sz['image']}px {sz['dtype']} B={b}"
  for label, t in best.items():
    rows.append((f"train step, {label}", f"{b / t:,.0f} img/s", f"{what}, {t * 1e3:.1f} ms"))
  rows.append(
    ("memory overhead", f"{best['memory'] / best['no memory']:.3f}x", f"M={sz['memory']:,}")
  )


def loss_mem(sz, rows):
  import loss_memory as lm  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  b, d = 64, 128
  for m in sz["loss_sizes"]:
    x = rng.normal(size=(b, d)).astype(np.float32)
    emb = jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))
    labels = jnp.asarray(rng.integers(0, max(m // 5, 1), size=b), jnp.int32)
    r = lm.make_memory(rng, m, d).emb  # the floor's reference rows
    # The library's step for each loss (its fast memory form), against the floor.
    # Each donates its memory: one of its own per loss, as loss_memory.py does.
    steps = [
      (lm.xbm_step_fn(labels, fast), (emb, lm.make_memory(rng, m, d)), True)
      for fast, _ in lm.LOSSES.values()
    ]
    t_floor, *t_steps = lm.timeit_interleaved(
      [(lm.floor, (emb, r), False)] + steps, sz["loss_iters"]
    )
    ratios = ", ".join(f"{n} {t / t_floor:.2f}x" for n, t in zip(lm.LOSSES, t_steps))
    rows.append(
      (
        f"loss+memory M={m:,}",
        f"{t_steps[0] * 1e3:.2f} ms",
        f"of the 2-product floor ({t_floor * 1e3:.2f} ms): {ratios}",
      )
    )


def retrieval(sz, rows):
  from xbm_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top

  # On an accelerator, score blocks of up to 2 GiB (fewer, larger products); the CPU
  # default (64 MiB) keeps host memory bounded.
  block_bytes = 64 * 2**20 if jax.default_backend() == "cpu" else 2**31
  for n, classes, map_r in sz["retrieval"]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, size=n)
    centers = rng.normal(size=(classes, 128)).astype(np.float32)
    x = centers[labels] + 1.5 * rng.normal(size=(n, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ks = (1, 10, 100, 1000)
    run = lambda: metrics.retrieval_metrics(
      x, labels, ks=ks, self_exclude=True, map_at_r=map_r, block_bytes=block_bytes, per_query=True
    )
    run()  # compile on the real shapes (the gallery size is static)
    t = time.perf_counter()
    res = run()
    dt = time.perf_counter() - t
    note = f"R@1 {res['recall@1']:.4f}, R@1000 {res['recall@1000']:.4f}" + (
      f", MAP@R {res['map@r']:.4f}" if map_r else ""
    )
    what = "R@1/10/100/1000" + (" + MAP@R" if map_r else "")
    what += f", {res['num_reranked_float64']:,} queries re-ranked in float64"
    rows.append((f"retrieval {n:,} x 128", f"{dt:.2f} s", f"{what}; {note}"))


def glyph_losses(steps: int) -> list[float]:
  """The first `steps` train/loss values of a glyph smoke run (float32 small CNN)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from xbm_jax.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location(
    "_glyph_config", os.path.join(ROOT, "configs", "glyphs.py")
  )
  glyph_cfg = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(glyph_cfg)
  c = glyph_cfg.get_config("smoke")
  c.train.steps, c.train.log_every, c.train.checkpoint_every = steps, 1, 10**9
  c.train.progress = False
  for ev in c.evals.values():
    ev.every_steps = 10**9
  with tempfile.TemporaryDirectory() as wd:
    train_and_evaluate(c, wd)
    with open(os.path.join(wd, "metrics.jsonl")) as f:
      recs = [json.loads(line) for line in f]
  return [float(r["train/loss"]) for r in recs if "train/loss" in r][:steps]


def glyphs(sz, rows, record=False):
  got = glyph_losses(sz["glyph_steps"])
  if record:
    os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
    with open(REFERENCE, "w") as f:
      json.dump(
        {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "losses": got}, f, indent=1
      )
  with open(REFERENCE) as f:
    ref = json.load(f)
  n = min(len(got), len(ref["losses"]))
  rel = np.abs(np.subtract(got[:n], ref["losses"][:n])) / np.abs(ref["losses"][:n])
  ok = "match" if rel.max() < 2e-2 else "DIFFER"
  rows.append(
    (
      "glyph first losses",
      ok,
      f"max rel diff {rel.max():.1e} over {n} steps "
      f"vs {ref['device']} (jax {ref['jax']}): " + " ".join(f"{v:.4f}" for v in got[:n]),
    )
  )


SECTIONS = {
  "env": env,
  "train_step": train_step,
  "loss_mem": loss_mem,
  "retrieval": retrieval,
  "glyphs": glyphs,
}


def main(argv=None) -> list:
  p = argparse.ArgumentParser()
  p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU wiring check)")
  p.add_argument("--sections", default=",".join(SECTIONS))
  p.add_argument(
    "--record-reference",
    action="store_true",
    help="write this run's glyph losses as the reference (CPU)",
  )
  p.add_argument("--json", help="also write the table here")
  args = p.parse_args(argv)
  sz = SMOKE if args.smoke else FULL
  rows = []
  for name in args.sections.split(","):
    t = time.perf_counter()
    try:
      if name == "glyphs":
        glyphs(sz, rows, record=args.record_reference)
      else:
        SECTIONS[name](sz, rows)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      rows.append((name, "FAILED", f"{type(e).__name__}: {e}"[:200]))
    print(f"[{name}: {time.perf_counter() - t:.0f} s]", flush=True)
  w = max(len(r[0]) for r in rows)
  print("\n" + "\n".join(f"{a:<{w}}  {b:>14}  {c}" for a, b, c in rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
