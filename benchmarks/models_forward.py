"""Parameter counts and eval-mode forward time per image for each backbone.

    python benchmarks/models_forward.py [--size 224] [--batch 8] [--repeats 5]
        [--models resnet50,resnet18,bninception,googlenet,small_cnn] [--dtype float32]

Times one jitted `model.apply(..., train=False)` (embeddings, head included) after
compilation, median over `repeats` calls, on whatever jax.devices()[0] is (CPU here).
Weights are random (filled with NumPy; flax's own init is not what is timed).
"""

import argparse
import time

import numpy as np
import jax
import jax.numpy as jnp

from xbm_jax import models


def random_variables(model, image_shape, seed=0):
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(image_shape, jnp.uint8))
  )

  def fill(path, leaf):
    if path[-1].key in ("scale", "var"):
      return np.ones(leaf.shape, np.float32)
    return (rng.standard_normal(leaf.shape) * 0.02).astype(np.float32)

  return jax.tree_util.tree_map_with_path(lambda p, l: jnp.asarray(fill(p, l)), dict(shapes))


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--embed-dim", type=int, default=128)
  parser.add_argument("--models", default="resnet50,resnet18,bninception,googlenet,small_cnn")
  args = parser.parse_args()
  print(
    f"device {jax.devices()[0].device_kind}, batch {args.batch}, {args.size}x"
    f"{args.size}, dtype {args.dtype}, embed_dim {args.embed_dim}"
  )
  print(
    f"{'model':12s} {'backbone params':>16s} {'head params':>12s} {'bn stats':>10s} "
    f"{'compile s':>10s} {'ms/image':>9s}"
  )
  for name in args.models.split(","):
    model = models.create({"name": name, "embed_dim": args.embed_dim, "dtype": args.dtype})
    shape = (args.batch, args.size, args.size, 3)
    variables = random_variables(model, shape)
    images = jnp.asarray(np.random.default_rng(1).integers(0, 256, shape, np.uint8))
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
    t0 = time.perf_counter()
    fwd.lower(variables, images).compile()
    jax.block_until_ready(fwd(variables, images))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fwd(variables, images))
      times.append(time.perf_counter() - t0)
    per_image_ms = 1e3 * float(np.median(times)) / args.batch
    print(
      f"{name:12s} {count(variables['params']['backbone']):16,d} "
      f"{count(variables['params']['head']):12,d} {count(variables['batch_stats']):10,d} "
      f"{compile_s:10.1f} {per_image_ms:9.1f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
