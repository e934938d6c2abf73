"""The memory term with head re-projection against the stale memory, in one run.

For B anchors, a memory of M rows, embedding dim D and pooled-feature dim F:

  stale:   enqueue B embeddings into an `[M, D]` float32 memory, then the
           contrastive L(B, M) and its gradient wrt the anchors (XBM as is);
  reproj:  enqueue B pooled features into an `[M, F]` bfloat16 memory
           (`xbm_jax.freshness.reprojection`), embed all M rows with the current linear
           head + L2 norm (in chunks), then the same loss and gradient.

The extra work is one `[M, F] x [F, D]` product (2 M F D flops) per step, against
the loss's two `[B, D] x [D, M]`-sized products (4 B M D flops): F / (2 B) times
as many flops, 16x for ResNet-50's F = 2048 and B = 64. The ratio below is the
measured one (best of --iters, interleaved, one process). The backbone's training
step is not in it: for ResNet-50 at 224 px (about 3 x 8.2 GFLOP per image per
training step) the projection of 55,000 rows (28.8 GFLOP) is about 2 % of a
batch of 64's step; the momentum encoder's extra forward (8.2 GFLOP per image)
adds about a third.

    python benchmarks/drift_options.py [--sizes 8000,55000] [--feature-dim 2048]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import xbm_jax
from loss_memory import make_memory, timeit_interleaved
from xbm_jax import losses, memory
from xbm_jax.freshness import reprojection


def stale_step(labels):
  def step(e, mem, head):
    del head  # the stored embeddings are used as they are

    def f(e):
      batch = xbm_jax.Embeddings(e, labels)
      new = memory.enqueue(mem, batch)
      return losses.contrastive(batch, new), new

    (loss, new), g = jax.value_and_grad(f, has_aux=True)(e)
    return loss, g, new

  return jax.jit(step, donate_argnums=1)


def reprojection_step(labels, pooled, chunk_rows):
  def step(e, mem, head):
    new = memory.enqueue(mem, xbm_jax.Embeddings(pooled, labels))
    project = lambda f: xbm_jax.l2_normalize(f.astype(jnp.float32) @ head[0] + head[1])
    reference = reprojection.embeddings(new, project, chunk_rows=chunk_rows)
    loss, g = jax.value_and_grad(
      lambda e: losses.contrastive(xbm_jax.Embeddings(e, labels), reference)
    )(e)
    return loss, g, new

  return jax.jit(step, donate_argnums=1)


def same_step_check(labels, pooled, head, features, chunk_rows):
  """Both steps give the same loss and gradient when the stale memory holds exactly
  what the re-projection computes (the anchors: the head's rows of `pooled`)."""
  project = lambda f: xbm_jax.l2_normalize(f.astype(jnp.float32) @ head[0] + head[1])
  stored = pooled.astype(jnp.bfloat16)  # what the feature memory keeps of the batch
  emb = project(stored)
  stale = copy_memory(reprojection.embeddings(features, project))  # donated below
  want = stale_step(labels)(emb, stale, head)
  got = reprojection_step(labels, pooled, chunk_rows)(emb, copy_memory(features), head)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-6)


def copy_memory(mem):
  return jax.tree.map(lambda x: jnp.array(x, copy=True), mem)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", default="8000,55000")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--feature-dim", type=int, default=2048)
  p.add_argument("--chunk-rows", type=int, default=4096)
  p.add_argument("--iters", type=int, default=10)
  args = p.parse_args(argv)
  b, d, f = args.batch, args.dim, args.feature_dim
  rng = np.random.default_rng(0)
  print(f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}  B={b} D={d} F={f}")
  print(f"{'M':>8} {'stale ms':>9} {'reproj ms':>10} {'ratio':>7} {'reproj MB/device':>17}")
  for m in [int(s) for s in args.sizes.split(",")]:
    x = rng.normal(size=(b, d)).astype(np.float32)
    emb = jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))
    labels = jnp.asarray(rng.integers(0, max(m // 5, 1), size=b), jnp.int32)
    pooled = jnp.asarray(np.abs(rng.normal(size=(b, f))), jnp.float32)
    head = (
      jnp.asarray(rng.normal(size=(f, d)) * np.sqrt(2 / d), jnp.float32),
      jnp.zeros((d,), jnp.float32),
    )
    stored = make_memory(rng, m, f)
    features = stored._replace(emb=jnp.abs(stored.emb).astype(jnp.bfloat16))
    same_step_check(labels, pooled, head, features, args.chunk_rows)
    times = timeit_interleaved(
      [
        (stale_step(labels), (emb, make_memory(rng, m, d), head), True),
        (reprojection_step(labels, pooled, args.chunk_rows), (emb, features, head), True),
      ],
      args.iters,
    )
    cost = reprojection.memory_bytes(size=m, feature_dim=f, embed_dim=d, chunk_rows=args.chunk_rows)
    print(
      f"{m:>8} {times[0] * 1e3:>9.2f} {times[1] * 1e3:>10.2f} "
      f"{times[1] / times[0]:>6.1f}x {cost.total / 1e6:>17.1f}"
    )


if __name__ == "__main__":
  main()
