"""Memory scaling: replicated vs sharded XBM memory on 8 (fake) devices.

For each memory size (default 1k, 10k, 100k, 1M; D = 128, global batch 64),
times one jitted step of enqueue + memory-loss forward/backward (grad w.r.t.
the local anchors) and reports the memory's bytes per device, for
`memory_sharding` = replicated and sharded. Writes a PNG and a JSON:

    python benchmarks/memory_scale.py                 # 8 fake CPU devices
    python benchmarks/memory_scale.py --sizes 1000,10000 --iters 5

The step cost should grow linearly with the size (the loss reads every row);
the sharded memory's bytes per device are 1/n of the replicated one's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--real-devices" not in sys.argv:  # must precede the jax import
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from xbm_jax import losses, memory
from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.embeddings import Embeddings, l2_normalize  # noqa: E402
from xbm_jax.memory import MemoryState  # noqa: E402

AX = "data"


def _full_memory(mode, size, dim, mesh, key):
  """A memory with every slot written (random unit rows, labels in [0, 1000)).

  Generated split over the devices (each makes only its rows), then copied
  to every device for `replicated`: no device ever holds generator temporaries
  of the whole memory.
  """
  n = mesh.shape[AX]
  split, repl = NamedSharding(mesh, P(AX)), NamedSharding(mesh, P())
  k1, k2 = jax.random.split(key)
  make = jax.jit(
    lambda: (
      l2_normalize(jax.random.normal(k1, (size, dim))),
      jax.random.randint(k2, (size,), 0, 1000, jnp.int32),
      jnp.ones((size,), jnp.bool_),
    ),
    out_shardings=(split, split, split),
  )
  emb, labels, valid = make()
  if mode == "sharded":
    return MemoryState(emb, labels, valid, jax.device_put(jnp.zeros((n,), jnp.int32), split))
  emb, labels, valid = jax.device_put((emb, labels, valid), repl)
  return MemoryState(emb, labels, valid, jax.device_put(jnp.zeros((), jnp.int32), repl))


def _step_fn(mode, mesh, loss_name, batch):
  """jit(shard_map): enqueue the batch, then value and grad of L(local, memory)."""
  n = mesh.shape[AX]
  b = batch // n
  if mode == "sharded":
    mem_spec = sharded_memory.specs(AX)
    loss_fn = losses.get(loss_name)
  else:
    mem_spec = MemoryState(P(), P(), P(), P())
    loss_fn = losses.get(loss_name)

  def body(mem, emb, labels):
    q = Embeddings(emb, labels)
    if mode == "sharded":
      mem = sharded_memory.enqueue_local(mem, q)
      f = lambda e: loss_fn(Embeddings(e, labels), mem, axis_name=AX)
    else:
      # The global batch as a device-invariant array (psum of one-hot placements).
      me = jax.lax.axis_index(AX)
      place = lambda v: jax.lax.psum(
        jax.lax.dynamic_update_slice_in_dim(
          jnp.zeros((n * b,) + v.shape[1:], v.dtype), v, me * b, axis=0
        ),
        AX,
      )
      mem = memory.enqueue(mem, Embeddings(place(emb), place(labels)))
      f = lambda e: loss_fn(Embeddings(e, labels), mem)
    loss, grad = jax.value_and_grad(f)(q.emb)
    return mem, loss[None], grad

  return jax.jit(
    jax.shard_map(
      body, mesh=mesh, in_specs=(mem_spec, P(AX), P(AX)), out_specs=(mem_spec, P(AX), P(AX))
    ),
    donate_argnums=(0,),
  )


def _bytes_per_device(mem) -> int:
  return int(sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(mem)))


def run(sizes, *, dim, batch, iters, loss_name, mesh):
  results = []
  rng = np.random.default_rng(0)
  for size in sizes:
    for mode in ("replicated", "sharded"):
      mem = _full_memory(mode, size, dim, mesh, jax.random.key(size))
      step = _step_fn(mode, mesh, loss_name, batch)
      split = NamedSharding(mesh, P(AX))
      emb = jax.device_put(
        l2_normalize(jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)), split
      )
      labels = jax.device_put(jnp.asarray(rng.integers(0, 1000, batch), jnp.int32), split)
      t0 = time.perf_counter()
      mem, loss, grad = jax.block_until_ready(step(mem, emb, labels))
      compile_s = time.perf_counter() - t0
      # Small sizes are dominated by dispatch noise: time more steps there.
      n_iter = max(1, iters * 4 if size <= 10_000 else iters if size < 1_000_000 else min(iters, 3))
      times = []
      for _ in range(n_iter):
        t0 = time.perf_counter()
        mem, loss, grad = jax.block_until_ready(step(mem, emb, labels))
        times.append(time.perf_counter() - t0)
      rec = {
        "size": size,
        "mode": mode,
        "step_s": float(np.median(times)),
        "step_s_min": float(np.min(times)),
        "iters": n_iter,
        "first_call_s": compile_s,
        "bytes_per_device": _bytes_per_device(mem),
        "loss": float(np.asarray(loss)[0]),
      }
      results.append(rec)
      print(
        f"size {size:>9,d} {mode:>10s}: step {rec['step_s'] * 1e3:9.2f} ms "
        f"(min {rec['step_s_min'] * 1e3:.2f}, {n_iter} iters)  "
        f"{rec['bytes_per_device'] / 2**20:9.2f} MiB/device",
        flush=True,
      )
      del mem, grad
  return results


def plot(results, path, *, n_devices, dim, batch, loss_name):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
  for mode, marker in (("replicated", "o"), ("sharded", "s")):
    rows = [r for r in results if r["mode"] == mode]
    sizes = [r["size"] for r in rows]
    ax_t.loglog(sizes, [r["step_s"] * 1e3 for r in rows], marker=marker, label=mode)
    ax_b.loglog(sizes, [r["bytes_per_device"] / 2**20 for r in rows], marker=marker, label=mode)
  ax_t.set(
    xlabel="memory size (entries)", ylabel="step time (ms)", title=f"enqueue + {loss_name} fwd/bwd"
  )
  ax_b.set(
    xlabel="memory size (entries)", ylabel="memory MiB per device", title="memory bytes per device"
  )
  for ax in (ax_t, ax_b):
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.suptitle(
    f"XBM memory scaling: {n_devices} devices ({jax.devices()[0].platform}), "
    f"D={dim}, global batch {batch}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="1000,10000,100000,1000000")
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--batch", type=int, default=64, help="global batch")
  ap.add_argument(
    "--iters", type=int, default=5, help="timed steps (x4 up to 10k; at most 3 from 1M)"
  )
  ap.add_argument("--loss", default="contrastive", choices=sorted(losses.LOSSES))
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
  ap.add_argument(
    "--real-devices", action="store_true", help="use the real devices instead of 8 fake CPU ones"
  )
  args = ap.parse_args(argv)
  n = jax.device_count()
  mesh = jax.make_mesh((n,), (AX,))
  sizes = [int(s) for s in args.sizes.split(",")]
  for s in sizes:
    sharded_memory.init(size=s, dim=1, n_shards=n)  # clear error if not divisible
  if args.batch % n:
    raise ValueError(f"--batch {args.batch} must be divisible by the {n} devices")
  os.makedirs(args.out, exist_ok=True)
  results = run(
    sizes, dim=args.dim, batch=args.batch, iters=args.iters, loss_name=args.loss, mesh=mesh
  )
  base = {r["mode"]: r for r in results if r["size"] == sizes[0]}
  print("\nsize        mode        step ms   x first size   MiB/device   sharded/replicated bytes")
  for r in results:
    other = next(o for o in results if o["size"] == r["size"] and o["mode"] == "replicated")
    print(
      f"{r['size']:>9,d}  {r['mode']:>10s}  {r['step_s'] * 1e3:9.2f}  "
      f"{r['step_s'] / base[r['mode']]['step_s']:9.1f}  "
      f"{r['bytes_per_device'] / 2**20:11.3f}  "
      f"{r['bytes_per_device'] / other['bytes_per_device']:.4f}"
    )
  meta = {
    "devices": n,
    "platform": jax.devices()[0].platform,
    "dim": args.dim,
    "batch": args.batch,
    "loss": args.loss,
    "results": results,
  }
  with open(os.path.join(args.out, "memory_scale.json"), "w") as f:
    json.dump(meta, f, indent=1)
  png = os.path.join(args.out, "memory_scale.png")
  plot(results, png, n_devices=n, dim=args.dim, batch=args.batch, loss_name=args.loss)
  print(f"wrote {png}")


if __name__ == "__main__":
  main()
