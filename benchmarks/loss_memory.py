"""Memory + loss step against its honest matmul floor, in one run.

For B=64, D=128 and memory sizes M: the jitted train-step part that XBM adds
(enqueue into a donated memory, as the train step donates its state, then
L(B, B) + L(B, M) forward and the gradient wrt the batch embeddings), against
the floor: the TWO products the step cannot avoid,

    s = e @ r.T        [B, M]   (forward similarities)
    g = s_grad @ r     [B, D]   (gradient wrt the anchors)

The memory gets no gradient, so there is no third product `s_grad.T @ e`
(an earlier version of this script timed one and flattered the step ~1.5x).
Both run at `Precision.HIGHEST`, as the loss does (exact float32 for the
self rule); on CPU every float32 dot is exact anyway.

Timed for each loss of the library: contrastive (one pass over S with a custom
VJP, `xbm_jax.fused`), the same loss through plain autodiff
(`losses.contrastive_plain`, to show what the one pass buys), multi-similarity
and triplet ("hard"), which still run through plain autodiff. "what-if" is the
benchmark's own hand-fused contrastive (value from the gradient product, one
select per pair), a lower bound for a fused formulation. `--hlo` prints the
fusions XLA emits over [B, M] arrays for each step. Figures are ratios timed in
one process, interleaved: these machines are noisy.

    python benchmarks/loss_memory.py [--sizes 8000,55000,200000] [--iters 20] [--hlo]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import xbm_jax
from xbm_jax import losses, memory

HI = jax.lax.Precision.HIGHEST


def timeit_interleaved(fns, iters):
  """Best wall time of each `(fn, args, donate)`, timed in turn each round so
  that a noisy neighbour slows them alike. A donating fn's args[1] (the
  memory) is replaced by its returned memory after each call."""
  args = [a for _, a, _ in fns]
  best = [float("inf")] * len(fns)
  for it in range(iters + 1):
    for i, (fn, _, donate) in enumerate(fns):
      t = time.perf_counter()
      out = jax.block_until_ready(fn(*args[i]))
      if it:  # the first round compiles
        best[i] = min(best[i], time.perf_counter() - t)
      if donate:
        args[i] = (args[i][0], out[-1]) + tuple(args[i][2:])
  return best


def make_memory(rng, m, d):
  filler = rng.normal(size=(m, d)).astype(np.float32)
  filler /= np.linalg.norm(filler, axis=1, keepdims=True)
  # Every slot valid: the worst case.
  return memory.init(size=m, dim=d)._replace(
    emb=jnp.asarray(filler),
    valid=jnp.ones((m,), bool),
    labels=jnp.asarray(rng.integers(0, max(m // 5, 1), size=m), jnp.int32),
  )


def xbm_step_fn(labels, loss_fn=losses.contrastive):
  def step(e, mem):
    def f(e):
      batch = xbm_jax.Embeddings(e, labels)
      new = memory.enqueue(mem, batch)
      return loss_fn(batch, batch) + loss_fn(batch, new), new

    (loss, new), g = jax.value_and_grad(f, has_aux=True)(e)
    return loss, g, new

  return jax.jit(step, donate_argnums=1)


def fused_step_fn(labels, margin=0.5, eps=losses.EPS_SELF):
  """What-if: contrastive's value and gradient from ONE pass over [B, M].

  With ds = d value / d s (-1 on active positives, +1 on active negatives,
  else 0), value = #pos + sum_ij ds_ij s_ij = #pos + sum(e * (ds @ r)): the
  value falls out of the gradient product, so the only [B, M] work besides
  the two products is the select that makes ds (and its positive count).
  """

  def one(e, ref_emb, ref_labels, ref_valid):
    s = jnp.matmul(e, ref_emb.T, precision=HI)
    same = labels[:, None] == ref_labels[None, :]
    pos = same & ref_valid[None, :] & (s < 1 - eps)
    neg = ~same & ref_valid[None, :] & (s > margin)
    ds = jnp.where(pos, -1.0, jnp.where(neg, 1.0, 0.0))
    g = jnp.matmul(ds, ref_emb, precision=HI)
    return jnp.sum(pos) + jnp.sum(e * g), g

  def step(e, mem):
    new = memory.enqueue(mem, xbm_jax.Embeddings(e, labels))
    vb, gb = one(e, e, labels, jnp.ones(labels.shape, bool))
    vm, gm = one(e, new.emb, new.labels, new.valid)
    b = e.shape[0]
    return (vb + vm) / b, (2 * gb + gm) / b, new  # L(B,B): both sides are e

  return jax.jit(step, donate_argnums=1)


@jax.jit
def floor(e, r):
  s = jnp.matmul(e, r.T, precision=HI)  # forward
  return s, jnp.matmul(s, r, precision=HI)  # grad wrt e (s stands in for s_grad)


def big_fusions(fn, args, b, m):
  """Names of the ops XLA emits that write a [B, M] array (one pass each)."""
  txt = fn.lower(*args).compile().as_text()
  entry = txt[txt.index("ENTRY") :]
  return [
    line.split("=")[0].strip()
    for line in entry.splitlines()
    if f"= f32[{b},{m}]" in line or f"= pred[{b},{m}]" in line
  ]


STEPS = {  # name -> loss of the library timed in the step
  "contrastive": losses.contrastive,
  "plain": losses.contrastive_plain,
  "ms": losses.multi_similarity,
  "triplet": losses.triplet,
}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", default="8000,55000,200000")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--hlo", action="store_true", help="list the [B, M] ops XLA emits")
  args = p.parse_args()
  b, d = args.batch, args.dim
  rng = np.random.default_rng(0)
  print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  B={b} D={d}")
  print("step time / floor time (the two products), best of --iters, interleaved")
  names = list(STEPS) + ["what-if"]
  print(f"{'M':>8} {'mem MB':>7} {'floor ms':>9} " + " ".join(f"{n:>11}" for n in names))
  for m in [int(s) for s in args.sizes.split(",")]:
    x = rng.normal(size=(b, d)).astype(np.float32)
    emb = jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))
    labels = jnp.asarray(rng.integers(0, max(m // 5, 1), size=b), jnp.int32)
    mem = make_memory(rng, m, d)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(mem))
    fns = {n: xbm_step_fn(labels, fn) for n, fn in STEPS.items()}
    fns["what-if"] = fused_step_fn(labels)
    check = {
      n: jax.device_get(fns[n](emb, make_memory(np.random.default_rng(m), m, d))[:2])
      for n in ("contrastive", "plain", "what-if")
    }
    for n in ("plain", "what-if"):  # the same loss and gradient three ways
      np.testing.assert_allclose(check[n][0], check["contrastive"][0], rtol=1e-4)
      np.testing.assert_allclose(check[n][1], check["contrastive"][1], rtol=1e-3, atol=1e-5)
    if args.hlo:
      for n, fn in fns.items():
        print(f"  {n}: [B, M] ops: " + "; ".join(big_fusions(fn, (emb, mem), b, m)))
    times = timeit_interleaved(
      [(floor, (emb, jnp.array(mem.emb, copy=True)), False)]
      + [(fns[n], (emb, make_memory(rng, m, d)), True) for n in names],
      args.iters,
    )
    cells = " ".join(f"{t / times[0]:>10.2f}x" for t in times[1:])
    print(f"{m:>8} {nbytes / 2**20:>7.1f} {times[0] * 1e3:>9.2f} {cells}")


if __name__ == "__main__":
  main()
