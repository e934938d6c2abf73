"""Train-step time with and without the memory, same model, measured in one run.

CPU (default): the glyph demo's small CNN, 28x28, batch 64, memory 8192.
GPU variant (one short command on a GPU machine):

    python benchmarks/train_step.py --model resnet50 --image 224 --batch 64 \
        --dtype bfloat16 --memory 55000 --steps 20

Prints the step time without memory, with memory (memory term active: enqueue +
L(B, M) forward/backward), and their ratio (the memory's overhead); then each
drift correction of the memory wired into the trainer (`xbm.drift_correction`,
`xbm.moments_ema`, `xbm.momentum_encoder`, `xbm.reprojection` with bfloat16
features), as its step time over the plain memory step's.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xbm_jax import memory, models, parallel
from xbm_jax.freshness import moments as drift_correction
from xbm_jax.freshness import momentum
from xbm_jax.cross_batch import CrossBatchMemory
from xbm_jax.freshness import reprojection
from xbm_jax.train import optim, setup, state as state_lib, step as step_lib


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="small_cnn")
  p.add_argument("--image", type=int, default=28)
  p.add_argument("--channels", type=int, default=1)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--embed_dim", type=int, default=64)
  p.add_argument("--memory", type=int, default=8192)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--steps", type=int, default=10)
  args = p.parse_args()
  channels = 3 if args.model != "small_cnn" and args.channels == 1 else args.channels
  mesh = parallel.make_mesh()
  mcfg = models.default_config()
  mcfg.update(name=args.model, embed_dim=args.embed_dim, dtype=args.dtype)
  model = models.create(mcfg, axis_name=parallel.DATA_AXIS)
  variables = models.init_variables(
    model, jax.random.PRNGKey(0), image_size=args.image, channels=channels
  )
  variables = jax.tree.map(np.asarray, variables)  # host copy: the step donates its state
  ocfg = ml_collections.ConfigDict(
    dict(name="adam", lr=1e-4, weight_decay=5e-4, b1=0.9, b2=0.999, eps=1e-8, schedule="constant")
  )
  direction = optim.make_direction(ocfg)
  xbm = CrossBatchMemory(size=args.memory, dim=args.embed_dim, data_axis=parallel.DATA_AXIS)
  make_step = lambda xbm=xbm, **options: step_lib.make_train_step(
    model=model,
    direction=direction,
    schedule=optim.make_schedule(ocfg, 1),
    xbm=xbm,
    mesh=mesh,
    **options,
  )
  plain = make_step()
  # label -> (step, start step, options); the memory is active from step 0 but in
  # "no memory".
  variants = {
    "no memory": (plain, 2**31 - 1, {}),
    "memory": (plain, 0, {}),
    "+ moments": (make_step(drift_correction="moments"), 0, {}),
    "+ moments EMA": (
      make_step(drift_correction="moments", moments_ema=0.9),
      0,
      {"moments": drift_correction.init(args.embed_dim)},
    ),
    "+ momentum": (
      make_step(momentum_encoder=0.99),
      0,
      {"key_encoder": momentum.init(variables["params"], variables["batch_stats"])},
    ),
    "+ reprojection": (
      make_step(dataclasses.replace(xbm, dim=setup.feature_dim(variables)), reprojection=True),
      0,
      {
        "memory": reprojection.init(
          size=args.memory, feature_dim=setup.feature_dim(variables), dtype=jnp.bfloat16
        )
      },
    ),
  }
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(
    {
      "image": rng.integers(0, 256, (args.batch, args.image, args.image, channels), dtype=np.uint8),
      "label": np.repeat(np.arange(args.batch // 4), 4).astype(np.int32),
    },
    mesh,
  )
  print(
    f"device: {jax.devices()[0].device_kind} x{mesh.size}  model={args.model} "
    f"image={args.image} batch={args.batch} dtype={args.dtype} memory={args.memory}"
  )
  runs = {}
  for label, (step_fn, start, extra) in variants.items():
    st = state_lib.create(
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      tx=direction,
      **{"memory": memory.init(size=args.memory, dim=args.embed_dim), **extra},
    )
    st = jax.device_put(st, step_lib.state_shardings(st, mesh))
    ctrl = {
      "start_step": jnp.int32(start),
      "xbm_weight": jnp.float32(1.0),
      "lr_scale": jnp.float32(1.0),
    }
    st, m = step_fn(st, batch, ctrl)  # compile (one program per set of options)
    jax.block_until_ready(m)
    runs[label] = [st, ctrl, step_fn]
  # Alternate the variants so that machine noise hits all alike; keep the best of each.
  times = {label: float("inf") for label in runs}
  for _ in range(args.steps):
    for label, run in runs.items():
      t = time.perf_counter()
      run[0], m = run[2](run[0], batch, run[1])
      jax.block_until_ready(m)
      times[label] = min(times[label], time.perf_counter() - t)
  for label, best in times.items():
    print(f"{label:>15}: {best * 1e3:8.1f} ms/step  ({args.batch / best:7.1f} images/s)")
  print(f"memory overhead: {times['memory'] / times['no memory']:.3f}x")
  for label in ("+ moments", "+ moments EMA", "+ momentum", "+ reprojection"):
    print(f"memory {label} over the memory step: {times[label] / times['memory']:.3f}x")


if __name__ == "__main__":
  main()
