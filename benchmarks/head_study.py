r"""The cheap converged regime: a trainable head on a frozen encoder's cached features.

    python scripts/build_cjk.py --name cjk_hard ...        # docs/study/README.md: the builds
    python benchmarks/head_study.py features --dataset cjk_hard   # once per dataset
    python benchmarks/head_study.py tune --arm ms_no_memory       # the val grid of one arm
    python benchmarks/head_study.py confirm --stage sealed        # docs/study/PLAN.md
    python benchmarks/head_study.py table                         # every table, from the jsonl

The committed glyph encoder (glyphs_data/pretrained_small_cnn32.msgpack, pretrained on JIS
level-2 kanji, none of them a class here) is frozen; each image's pooled 128-d feature
(eval transform: centre crop 28 of 32) is computed once per split and cached. A head
(2-layer MLP 128 -> 256 -> 64, L2-normalised rows; input standardised by the train
split's mean / std) is trained from scratch by Adam on P x K = 16 x 4 batches (a train
class has exactly 4 images, so a batch is 16 whole classes), optionally against the
memory (the library's `xbm_jax.memory` ring of the whole train set, filled from the
initial head at step 0, and `xbm_jax.objective.xbm_total_loss`: L(B, B) + w L(B, M)).
A memory arm with `momentum` enqueues the batch as embedded by an EMA copy of the head.

Losses: the library's `xbm_jax.losses.contrastive` / `multi_similarity`, and `supcon`
below (supervised InfoNCE, Khosla et al. 2020, "L_out"; a plain loss function defined
HERE, not in the library, passed to `xbm_total_loss` as a function).

Records: one json line per run in benchmarks/out/head/<stage>.jsonl (the point, the val
curve, the final metrics, wall time, commit and dirty flag); `table` rebuilds
docs/study/head_tables.md from those files alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OUT = os.path.join(ROOT, "benchmarks", "out", "head")
CACHE = os.path.expanduser("~/.cache/xbm_jax/head_features")
DATA_DIR = os.path.expanduser("~/.cache/xbm_jax/tfds")
ENCODER = os.path.join(ROOT, "xbm_jax", "data", "glyphs_data", "pretrained_small_cnn32.msgpack")
HIDDEN, EMBED = 256, 64
P, K = 16, 4


# ---------------------------------------------------------------- features (cached once)


def encoder_features(images: np.ndarray, batch: int = 1024) -> np.ndarray:
  """uint8 [N, 32, 32] -> float32 [N, 128]: the committed encoder's max-pooled features
  (eval mode) of the centre 28 x 28 crop (the glyph configs' eval transform)."""
  import jax
  import jax.numpy as jnp
  from flax import serialization

  from xbm_jax.models import factory

  model = factory.create({"name": "small_cnn", "embed_dim": 64, "width": 32})
  with open(ENCODER, "rb") as f:
    v = serialization.msgpack_restore(f.read())
  variables = {"params": v["params"], "batch_stats": v["batch_stats"]}
  fn = jax.jit(lambda x: model.apply(variables, x, train=False, method=model.features))
  out = []
  for i in range(0, len(images), batch):
    x = images[i : i + batch, 2:30, 2:30, None]
    n = len(x)
    if n < batch:  # one compiled shape
      x = np.concatenate([x, np.zeros((batch - n,) + x.shape[1:], x.dtype)])
    out.append(np.asarray(fn(jnp.asarray(x)))[:n])
  return np.concatenate(out).astype(np.float32)


def cmd_features(args) -> None:
  from xbm_jax.data import sources

  os.makedirs(os.path.join(CACHE, args.dataset), exist_ok=True)
  for split in sources.splits(args.dataset, args.data_dir):
    t0 = time.time()
    src = sources.load(args.dataset, split, args.data_dir)
    exs = []
    for i in range(0, len(src), 4096):
      exs += src.__getitems__(range(i, min(i + 4096, len(src))))
    images = np.stack([np.asarray(e["image"])[..., 0] for e in exs])
    labels = np.asarray([e["label"] for e in exs], np.int64)
    feats = encoder_features(images)
    np.savez(os.path.join(CACHE, args.dataset, f"{split}.npz"), feats=feats, labels=labels)
    print(f"{args.dataset}/{split}: {feats.shape} in {time.time() - t0:.0f} s", flush=True)


def load_split(dataset: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  z = np.load(os.path.join(CACHE, dataset, f"{split}.npz"))
  return z["feats"], z["labels"]


# ---------------------------------------------------------------- the losses and the head


def supcon(query, reference, *, temperature=0.1):
  """Supervised InfoNCE (SupCon's L_out) of each anchor against `reference`, averaged over
  the anchors with a positive. Per anchor i: -mean_{p in P(i)} log softmax_{a in A(i)}(S/t)[p],
  with A(i) every valid reference row but the anchor itself (S < 1 - 1e-5, the library's
  similarity self-exclusion) and P(i) those of its label. Memory rows are detached."""
  import jax
  import jax.numpy as jnp

  from xbm_jax.embeddings import valid_mask

  s = jnp.dot(query.emb.astype(jnp.float32), reference.emb.astype(jnp.float32).T)
  cand = valid_mask(reference)[None, :] & (jax.lax.stop_gradient(s) < 1.0 - 1e-5)
  pos = cand & (query.labels[:, None] == reference.labels[None, :])
  logits = jnp.where(cand, s / temperature, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=1, keepdims=True)
  logp = jnp.where(pos, logits - lse, 0.0)
  npos = pos.sum(axis=1)
  has = npos > 0
  per = -logp.sum(axis=1) / jnp.maximum(npos, 1)
  return jnp.sum(jnp.where(has, per, 0.0)) / jnp.maximum(has.sum(), 1)


def supcon_oracle(q, ql, r, rl, temperature):
  """NumPy loops: the same loss (tests/benchmarks/test_head_study.py)."""
  s = q.astype(np.float64) @ r.astype(np.float64).T
  tot, n = 0.0, 0
  for i in range(len(q)):
    a = [j for j in range(len(r)) if s[i, j] < 1 - 1e-5]
    p = [j for j in a if rl[j] == ql[i]]
    if not p:
      continue
    z = np.log(np.sum(np.exp(s[i, a] / temperature)))
    tot += -np.mean([s[i, j] / temperature - z for j in p])
    n += 1
  return tot / max(n, 1)


def init_head(seed: int, d_in: int) -> dict:
  """Kaiming-uniform-like init (fan_in), zero biases; a plain dict of arrays."""
  rng = np.random.default_rng([seed, 7])
  lim1, lim2 = math.sqrt(6.0 / d_in), math.sqrt(6.0 / HIDDEN)
  return {
    "w1": rng.uniform(-lim1, lim1, (d_in, HIDDEN)).astype(np.float32),
    "b1": np.zeros(HIDDEN, np.float32),
    "w2": rng.uniform(-lim2, lim2, (HIDDEN, EMBED)).astype(np.float32),
    "b2": np.zeros(EMBED, np.float32),
  }


def head_apply(p, x):
  import jax.numpy as jnp

  h = jnp.maximum(x @ p["w1"] + p["b1"], 0.0)
  e = h @ p["w2"] + p["b2"]
  return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def pk_batches(labels: np.ndarray, steps: int, seed: int) -> np.ndarray:
  """int32 [steps, P * K]: rows of `labels`, each step P classes (epochs over a seeded
  class permutation) x K of their images (all K when a class has exactly K)."""
  rng = np.random.default_rng([seed, 11])
  classes, inv = np.unique(labels, return_inverse=True)
  rows = [np.flatnonzero(inv == c) for c in range(len(classes))]
  out = np.empty((steps, P * K), np.int32)
  order, pos = rng.permutation(len(classes)), 0
  for t in range(steps):
    if pos + P > len(order):
      order, pos = rng.permutation(len(classes)), 0
    cs = order[pos : pos + P]
    pos += P
    out[t] = np.concatenate(
      [r if len(r) == K else rng.choice(r, K, len(r) < K) for r in (rows[c] for c in cs)]
    )
  return out


# ---------------------------------------------------------------- arms, training


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  loss: str  # contrastive | multi_similarity | supcon
  memory: bool = False
  momentum: float = 0.0  # EMA decay of the head whose embeddings are enqueued
  weight: float = 1.0


ARMS = {
  a.name: a
  for a in [
    Arm("contrastive_no_memory", "contrastive"),
    Arm("ms_no_memory", "multi_similarity"),
    Arm("supcon_no_memory", "supcon"),
    Arm("contrastive_memory", "contrastive", memory=True),
    Arm("ms_memory", "multi_similarity", memory=True),
    Arm("supcon_memory", "supcon", memory=True),
    Arm("ms_memory_momentum", "multi_similarity", memory=True, momentum=0.99),
    Arm("supcon_memory_momentum", "supcon", memory=True, momentum=0.99),
  ]
}
HP = {  # each loss's own hyperparameters: defaults and the tuning line (stage 2)
  "contrastive": ({"margin": 0.5}, [{"margin": m} for m in (0.3, 0.4, 0.6, 0.7)]),
  "multi_similarity": (
    {"beta": 40.0, "mining_margin": 0.1},
    [
      {"beta": 10.0, "mining_margin": 0.1},
      {"beta": 80.0, "mining_margin": 0.1},
      {"beta": 40.0, "mining_margin": 0.05},
      {"beta": 40.0, "mining_margin": 0.3},
    ],
  ),
  "supcon": ({"temperature": 0.1}, [{"temperature": t} for t in (0.03, 0.05, 0.2, 0.5)]),
}
LRS = (1e-4, 3e-4, 1e-3)
SCHEDULES = ("constant", "cosine")
# `tune --grid reduced` (docs/study/PLAN.md section 2, the budget): cosine only, and two
# values of each loss's line, picked from the no-memory val tuning at 7,500 steps.
REDUCED_SCHEDULES = ("cosine",)
REDUCED_LINE = {
  "contrastive": [{"margin": 0.3}, {"margin": 0.4}],
  "multi_similarity": [
    {"beta": 40.0, "mining_margin": 0.05},
    {"beta": 40.0, "mining_margin": 0.3},
  ],
  "supcon": [{"temperature": 0.05}, {"temperature": 0.2}],
}


def loss_fn(name: str):
  if name == "supcon":
    return supcon
  from xbm_jax import losses

  return losses.get(name)


_COMPILED: dict = {}


def _trainer(arm: Arm, hp_keys: tuple, n_train: int, d_in: int, chunk: int):
  """A jitted `chunk`-step scan for this arm's structure (lr, schedule and the loss's
  hyperparameters are traced arguments: one compile serves the arm's whole grid)."""
  key = (arm, hp_keys, n_train, d_in, chunk)
  if key in _COMPILED:
    return _COMPILED[key]
  import jax
  import jax.numpy as jnp
  import optax

  from xbm_jax import memory as memory_lib
  from xbm_jax.embeddings import Embeddings
  from xbm_jax.objective import xbm_total_loss

  fn = loss_fn(arm.loss)
  adam = optax.scale_by_adam()

  def one(carry, inp, feats, labels, lr, cosine, total_steps, hp):
    params, opt, mem, mparams = carry
    idx, t = inp
    x, y = feats[idx], labels[idx]
    kw = dict(zip(hp_keys, hp))

    def objective(p):
      q = Embeddings(emb=head_apply(p, x), labels=y)
      if not arm.memory:
        return fn(q, q, **kw), (mem, jnp.zeros(()))
      if arm.momentum:
        k = Embeddings(emb=jax.lax.stop_gradient(head_apply(mparams, x)), labels=y)
        m2 = memory_lib.enqueue(mem, k)
        tot, m2, aux = xbm_total_loss(
          q, q, m2, step=t, start_step=0, weight=arm.weight, loss=fn, enqueue=False, **kw
        )
      else:
        tot, m2, aux = xbm_total_loss(
          q, q, mem, step=t, start_step=0, weight=arm.weight, loss=fn, **kw
        )
      return tot, (m2, aux["loss_xbm"])

    (tot, (mem2, lm)), g = jax.value_and_grad(objective, has_aux=True)(params)
    upd, opt = adam.update(g, opt, params)
    frac = t.astype(jnp.float32) / total_steps
    lr_t = jnp.where(cosine, lr * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)), lr)
    params = jax.tree.map(lambda p, u: p - lr_t * u, params, upd)
    if arm.momentum:
      mparams = jax.tree.map(
        lambda a, b: arm.momentum * a + (1 - arm.momentum) * b, mparams, params
      )
    return (params, opt, mem2, mparams), jnp.stack([tot, lm])

  @jax.jit
  def run_chunk(carry, idx, ts, feats, labels, lr, cosine, total_steps, hp):
    body = lambda c, i: one(c, i, feats, labels, lr, cosine, total_steps, hp)
    return jax.lax.scan(body, carry, (idx, ts))

  def init(params, feats, labels):
    opt = adam.init(params)
    if arm.memory:
      mem = memory_lib.init(size=n_train, dim=EMBED)
      mem = memory_lib.enqueue(mem, Embeddings(emb=head_apply(params, feats), labels=labels))
    else:
      mem = memory_lib.init(size=1, dim=EMBED)
    return (params, opt, mem, params)

  _COMPILED[key] = (run_chunk, jax.jit(init))
  return _COMPILED[key]


def evaluate(params, feats, labels) -> dict:
  import jax

  from xbm_jax.evaluation import metrics

  emb = np.asarray(jax.jit(head_apply)(params, feats))
  r = metrics.retrieval_metrics(emb, labels, ks=(1,), self_exclude=True)
  return {"r1": r["recall@1"], "map": r["map@r"]}


def standardise(train_f, *others):
  mu, sd = train_f.mean(0), train_f.std(0) + 1e-6
  return [(f - mu) / sd for f in (train_f, *others)]


def train_run(
  arm: Arm, point: dict, seed: int, *, steps: int, train, evals: dict, eval_at, chunk: int = 500
) -> dict:
  """Trains one head; evaluates every split of `evals` ({name: (feats, labels)}) at the
  steps `eval_at` (and at 0). Returns the curve and the wall time."""
  import jax.numpy as jnp

  tf, tl = train
  hp_keys = tuple(sorted(point["hp"]))
  run_chunk, init = _trainer(arm, hp_keys, len(tf), tf.shape[1], chunk)
  t0 = time.time()
  batches = pk_batches(tl, steps, seed)
  feats, labels = jnp.asarray(tf), jnp.asarray(tl, jnp.int32)
  params = {k: jnp.asarray(v) for k, v in init_head(seed, tf.shape[1]).items()}
  carry = init(params, feats, labels)
  hp = tuple(jnp.float32(point["hp"][k]) for k in hp_keys)
  lr, cos = jnp.float32(point["lr"]), jnp.bool_(point["schedule"] == "cosine")
  curve = [
    {
      "step": 0,
      **{f"{n}/{m}": v for n, (f, l) in evals.items() for m, v in evaluate(carry[0], f, l).items()},
    }
  ]
  done, losses = 0, []
  marks = sorted(set(eval_at) | {steps})
  while done < steps:
    n = min(chunk, steps - done)
    idx = np.zeros((chunk, P * K), np.int32)
    idx[:n] = batches[done : done + n]
    if n < chunk:  # pad with repeats: extra steps would train, so the chunk always divides
      raise ValueError(f"steps {steps} must be a multiple of the chunk {chunk}")
    ts = jnp.arange(done, done + chunk, dtype=jnp.int32)
    carry, out = run_chunk(
      carry, jnp.asarray(idx), ts, feats, labels, lr, cos, jnp.float32(steps), hp
    )
    out = np.asarray(out)
    done += chunk
    losses.append(out.mean(0).tolist())
    if not np.isfinite(out).all():
      curve.append({"step": done, "nonfinite": True})
      break
    if done in marks:
      row = {"step": done, "loss": float(out[:, 0].mean()), "loss_xbm": float(out[:, 1].mean())}
      for name, (f, l) in evals.items():
        row.update({f"{name}/{m}": v for m, v in evaluate(carry[0], f, l).items()})
      curve.append(row)
  return {"curve": curve, "wall_s": round(time.time() - t0, 1)}


def git_info() -> dict:
  from benchmarks import study_records

  return study_records.git_commit(ROOT, ["benchmarks/head_study.py", "xbm_jax"])


def append(stage: str, rec: dict) -> None:
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, f"{stage}.jsonl"), "a") as f:
    f.write(json.dumps(rec) + "\n")


def read(stage: str) -> list[dict]:
  path = os.path.join(OUT, f"{stage}.jsonl")
  if not os.path.exists(path):
    return []
  return [json.loads(l) for l in open(path) if l.strip()]


def tag(point: dict) -> str:
  hp = ",".join(f"{k}={v:g}" for k, v in sorted(point["hp"].items()))
  return f"lr={point['lr']:g},{point['schedule']},{hp}"


def final(rec: dict, key: str) -> float:
  last = rec["curve"][-1]
  return float(last.get(key, float("nan"))) if not last.get("nonfinite") else float("-inf")


def cmd_tune(args) -> None:
  """The val grid of one arm (seed 0): stage 1 lr x schedule at the loss's defaults,
  stage 2 the loss's hyperparameter line at stage 1's winner, then one lr step beyond
  the grid where the winner sits at its edge. Every run is recorded."""
  arm = ARMS[args.arm]
  ds = args.dataset
  tr = load_split(ds, "train")
  va = load_split(ds, "val")
  trf, vaf = standardise(tr[0], va[0])
  evals = {"val": (vaf, va[1])}
  eval_at = [int(s) for s in args.eval_at.split(",")]
  have = {r["tag"]: r for r in read(args.stage) if r["arm"] == arm.name}

  def run(point):
    t = tag(point)
    if t in have:
      return have[t]
    res = train_run(
      arm, point, 0, steps=args.steps, train=(trf, tr[1]), evals=evals, eval_at=eval_at
    )
    rec = {
      "stage": args.stage,
      "dataset": ds,
      "arm": arm.name,
      "seed": 0,
      "tag": t,
      "point": point,
      "steps": args.steps,
      **res,
      **git_info(),
    }
    append(args.stage, rec)
    have[t] = rec
    last = rec["curve"][-1]
    print(
      f"{arm.name} {t}: val map {last.get('val/map')} r1 {last.get('val/r1')} ({rec['wall_s']} s)",
      flush=True,
    )
    return rec

  score = lambda r: final(r, "val/map")
  defaults, line = HP[arm.loss]
  schedules = SCHEDULES
  if args.grid == "reduced":
    schedules, line = REDUCED_SCHEDULES, REDUCED_LINE[arm.loss]
  best = max(
    (run({"lr": lr, "schedule": s, "hp": defaults}) for lr in LRS for s in schedules), key=score
  )
  best = max([best] + [run({**best["point"], "hp": hp}) for hp in line], key=score)
  lrs = list(LRS)
  while best["point"]["lr"] in (lrs[0], lrs[-1]) and len(lrs) < len(LRS) + 2:  # beyond the edge
    lr = lrs[0] / 3.0 if best["point"]["lr"] == lrs[0] else lrs[-1] * 3.0
    lrs = sorted(lrs + [lr])
    best = max([best, run({**best["point"], "lr": float(f"{lr:.3g}")})], key=score)
  print(f"CHOSEN {arm.name}: {best['tag']} val map {score(best):.4f}", flush=True)


def chosen(stage: str, arm: str) -> dict:
  recs = [r for r in read(stage) if r["arm"] == arm]
  return max(recs, key=lambda r: final(r, "val/map"))["point"]


def cmd_confirm(args) -> None:
  """The pre-registered runs (docs/study/PLAN.md): each arm at its chosen point (read
  from the tuning records), seeds `--seeds`, trained on `--dataset`'s train split and
  scored once on its test split."""
  ds = args.dataset
  tr = load_split(ds, "train")
  te = load_split(ds, "test")
  trf, tef = standardise(tr[0], te[0])
  eval_at = [int(s) for s in args.eval_at.split(",")]
  have = {(r["arm"], r["seed"]) for r in read(args.stage)}
  for name in args.arms.split(","):
    point = chosen(args.tune_stage, name)
    for seed in [int(s) for s in args.seeds.split(",")]:
      if (name, seed) in have:
        continue
      res = train_run(
        ARMS[name],
        point,
        seed,
        steps=args.steps,
        train=(trf, tr[1]),
        evals={"test": (tef, te[1])},
        eval_at=eval_at,
      )
      rec = {
        "stage": args.stage,
        "dataset": ds,
        "arm": name,
        "seed": seed,
        "tag": tag(point),
        "point": point,
        "steps": args.steps,
        **res,
        **git_info(),
      }
      append(args.stage, rec)
      last = rec["curve"][-1]
      print(
        f"{args.stage} {name} s{seed}: test r1 {last.get('test/r1')} map {last.get('test/map')} ({rec['wall_s']} s)",
        flush=True,
      )


def cmd_table(args) -> None:
  """Every run of every stage file: its point, final metrics, wall time, commit."""
  lines = [
    "| stage | arm | seed | point | steps | curve (step: val/test MAP@R) | final R@1 | final MAP@R | wall s | commit |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for fname in sorted(os.listdir(OUT)) if os.path.isdir(OUT) else []:
    if not fname.endswith(".jsonl"):
      continue
    for r in read(fname[: -len(".jsonl")]):
      split = "val" if "val/map" in r["curve"][-1] else "test"
      curve = " ".join(f"{c['step']}:{c.get(split + '/map', float('nan')):.3f}" for c in r["curve"])
      lines.append(
        f"| {r['stage']} | {r['arm']} | {r['seed']} | {r['tag']} | {r['steps']} | {curve} | "
        f"{final(r, split + '/r1'):.4f} | {final(r, split + '/map'):.4f} | {r['wall_s']} | "
        f"{r['commit'][:7]}{'+dirty' if r['dirty'] else ''} |"
      )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = p.add_subparsers(dest="cmd", required=True)
  f = sub.add_parser("features")
  f.add_argument("--dataset", required=True)
  f.add_argument("--data_dir", default=DATA_DIR)
  t = sub.add_parser("tune")
  t.add_argument("--arm", required=True, choices=sorted(ARMS))
  t.add_argument("--dataset", default="cjk_hard")
  t.add_argument("--stage", default="tune")
  t.add_argument("--steps", type=int, default=10000)
  t.add_argument("--eval_at", default="1000,2500,5000,7500,10000")
  t.add_argument("--grid", default="full", choices=["full", "reduced"])
  c = sub.add_parser("confirm")
  c.add_argument("--stage", required=True)
  c.add_argument("--dataset", default="cjk_sealed")
  c.add_argument("--tune_stage", default="tune")
  c.add_argument("--arms", required=True)
  c.add_argument("--seeds", default="3,4,5,6,7")
  c.add_argument("--steps", type=int, default=10000)
  c.add_argument("--eval_at", default="2500,5000,10000")
  b = sub.add_parser("table")
  b.add_argument("--out", default=os.path.join(ROOT, "docs", "study", "head_tables.md"))
  args = p.parse_args(argv)
  if args.cmd == "table":
    cmd_table(args)
  else:
    {"features": cmd_features, "tune": cmd_tune, "confirm": cmd_confirm}[args.cmd](args)


if __name__ == "__main__":
  main()
