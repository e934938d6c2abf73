"""Memory + contrastive loss cost against the matmul roofline, measured in one run.

For B=64, D=128 and memory sizes M in {8k, 55k, 200k}: the jitted
enqueue + contrastive L(B, M) forward+backward time, the bytes the memory holds,
and the ratio to a bare matmul of the same shapes (B x D @ D x M forward, and
the two matmuls of the backward: 3 matmuls of 2*B*M*D flops) timed in the same
process. Figures are ratios because these machines are noisy.

    python benchmarks/loss_memory.py [--sizes 8000,55000,200000] [--iters 20]
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import xbm_jax
from xbm_jax import losses, memory


def timeit(fn, *args, iters):
  out = fn(*args)
  jax.block_until_ready(out)
  best = float("inf")
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", default="8000,55000,200000")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--iters", type=int, default=20)
  args = p.parse_args()
  b, d = args.batch, args.dim
  rng = np.random.default_rng(0)
  print(f"device: {jax.devices()[0].device_kind}  B={b} D={d}")
  print(f"{'M':>8} {'mem MB':>8} {'xbm ms':>8} {'matmul ms':>9} {'ratio':>6} {'GFLOP/s':>8}")
  for m in [int(s) for s in args.sizes.split(",")]:
    x = rng.normal(size=(b, d)).astype(np.float32)
    emb = jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))
    labels = jnp.asarray(rng.integers(0, m // 5, size=b), jnp.int32)
    mem = memory.init(size=m, dim=d)
    # Fill the memory so that every slot is valid (the worst case).
    filler = rng.normal(size=(m, d)).astype(np.float32)
    filler /= np.linalg.norm(filler, axis=1, keepdims=True)
    mem = mem._replace(emb=jnp.asarray(filler), valid=jnp.ones((m,), bool),
                       labels=jnp.asarray(rng.integers(0, m // 5, size=m), jnp.int32))

    @jax.jit
    def xbm_step(e, mem):
      def f(e):
        batch = xbm_jax.Embeddings(e, labels)
        new = memory.enqueue(mem, batch)
        return losses.contrastive(batch, new), new
      (loss, new), g = jax.value_and_grad(f, has_aux=True)(e)
      return loss, g, new

    @jax.jit
    def matmuls(e, r):
      s = e @ r.T                     # forward
      return s, s @ r, s.T @ e        # the two backward products

    t_xbm = timeit(xbm_step, emb, mem, iters=args.iters)
    t_mm = timeit(matmuls, emb, mem.emb, iters=args.iters)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(mem))
    flops = 3 * 2 * b * m * d
    print(f"{m:>8} {nbytes / 2**20:>8.1f} {t_xbm * 1e3:>8.2f} {t_mm * 1e3:>9.2f} "
          f"{t_xbm / t_mm:>6.2f} {flops / t_xbm / 1e9:>8.1f}")


if __name__ == "__main__":
  main()
