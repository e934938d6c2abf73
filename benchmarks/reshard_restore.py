"""Peak bytes of restoring a sharded memory onto another device count.

Saves a train state whose memory (default 262144 x 128 float32, 128 MiB) is
sharded over 8 devices, then restores it onto `--n_new` devices in fresh
processes, two ways:

  shard by shard  `Checkpointer.restore_resharded`: orbax reads each device's
                  block, `sharded_memory.reshard_on_mesh` re-lays them on device;
  whole on host   the former path: the whole memory read into host arrays,
                  re-laid there (`sharded_memory.reshard`), then placed.

and prints, in units of one new shard (size / n_new rows): the bytes each device
holds after the restore, the re-lay program's per-device arguments + outputs +
temporaries (XLA's memory analysis), and the process's peak resident memory
above its level just before the restore (VmHWM, reset first). On fake CPU
devices one process holds every device, so its host peak counts all n_new shards
(the devices' buffers are host memory): compare the two paths with each other.

    python benchmarks/reshard_restore.py                 # 8 -> 4 fake CPU devices
    python benchmarks/reshard_restore.py --rows 65536 --n_new 8 --n_old 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

if "jax" not in sys.modules:  # run as a script (a test importing it has its devices)
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.parallel import DATA_AXIS  # noqa: E402
from xbm_jax.train import checkpoint, state as state_lib, step as step_lib  # noqa: E402


def make_state(rows: int, dim: int, n: int, *, fill: bool):
  """A train state with tiny params and a `rows x dim` memory sharded over n devices
  (random rows and shard pointers when `fill`), placed on an n-device mesh."""
  mesh = jax.make_mesh((n,), (DATA_AXIS,), devices=jax.devices()[:n])
  mem = sharded_memory.init(size=rows, dim=dim, n_shards=n, mesh=mesh)
  if fill:
    rng = np.random.default_rng(0)
    k = rows // n
    mem = jax.jit(
      lambda m: m._replace(
        emb=jax.random.normal(jax.random.PRNGKey(1), m.emb.shape, m.emb.dtype),
        labels=jnp.arange(rows, dtype=jnp.int32),
        valid=jnp.ones_like(m.valid),
        ptr=jnp.asarray(rng.integers(0, k, n), jnp.int32),
      ),
      out_shardings=sharded_memory.shardings(mesh, DATA_AXIS),
    )(mem)
  st = state_lib.create(params={"w": jnp.ones((4,))}, batch_stats={}, tx=optax.sgd(0.1), memory=mem)
  shardings = step_lib.state_shardings(st, mesh, sharded_memory=True)
  return jax.device_put(st, shardings), mesh


def _rss() -> dict:
  with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS


def restore_whole_on_host(ckpt, state, mesh):
  """The former path: the memory read whole into host arrays, re-laid there."""
  abstract = checkpoint.abstract_like(state)
  ptr_shape = ckpt.saved_memory_ptr_shape()
  mem = abstract.memory._replace(ptr=jax.ShapeDtypeStruct(ptr_shape, jnp.int32))
  mem = jax.tree.map(lambda a: np.empty(a.shape, a.dtype), mem)
  st, host = ckpt.restore(abstract.replace(memory=mem))
  new = sharded_memory.restore(jax.tree.map(np.asarray, st.memory), mesh)
  return st.replace(memory=new), host


def child(args) -> dict:
  if args.mode == "save":
    st, _ = make_state(args.rows, args.dim, args.n_old, fill=True)
    ck = checkpoint.Checkpointer(args.dir)
    ck.save(1, st, {})
    ck.close()
    return {}
  st, mesh = make_state(args.rows, args.dim, args.n_new, fill=False)
  ck = checkpoint.Checkpointer(args.dir)
  shard = sum(leaf.nbytes for leaf in jax.tree.leaves(st.memory)) // args.n_new
  out = {"whole_bytes": shard * args.n_new, "shard_bytes": shard}
  if args.mode == "new":
    leaves = [st.memory.emb, st.memory.labels, st.memory.valid]
    ptr = np.zeros((args.n_old,), np.int32)
    compiled = sharded_memory.relayout_program(mesh, DATA_AXIS, 3).lower(ptr, *leaves).compile()
    m = compiled.memory_analysis()
    out["relayout_device_bytes"] = (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      - m.alias_size_in_bytes
      + m.temp_size_in_bytes
    )
  del st
  st, mesh = make_state(args.rows, args.dim, args.n_new, fill=False)
  base = _rss()["VmRSS"]
  _reset_peak()
  if args.mode == "new":
    got, _ = ck.restore_resharded(st, mesh)
  else:
    got, _ = restore_whole_on_host(ck, st, mesh)
  jax.block_until_ready(got)
  out["host_peak_above_start"] = _rss()["VmHWM"] - base
  per_device = {}
  for leaf in jax.tree.leaves(got.memory):
    for s in leaf.addressable_shards:
      per_device[s.device.id] = per_device.get(s.device.id, 0) + s.data.nbytes
  out["device_bytes_after"] = max(per_device.values())
  out["labels"] = np.asarray(jax.device_get(got.memory.labels))[::997].tolist()
  ck.close()
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=262144)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--n_old", type=int, default=8)
  p.add_argument("--n_new", type=int, default=4)
  p.add_argument("--mode", default="", help=argparse.SUPPRESS)
  p.add_argument("--dir", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.mode:
    print(json.dumps(child(args)))
    return None
  run = lambda mode, d: json.loads(
    subprocess.run(
      [sys.executable, __file__, *(argv or sys.argv[1:]), "--mode", mode, "--dir", d],
      check=True,
      capture_output=True,
      text=True,
    )
    .stdout.strip()
    .splitlines()[-1]
  )
  with tempfile.TemporaryDirectory() as d:
    run("save", d)
    new, old = run("new", d), run("old", d)
  assert new.pop("labels") == old.pop("labels"), "the two paths disagree"
  shard = new["shard_bytes"]
  print(
    f"memory {args.rows} x {args.dim} float32 on {args.n_old} -> {args.n_new} devices: "
    f"whole {new['whole_bytes'] / 2**20:.1f} MiB, one new shard {shard / 2**20:.1f} MiB"
  )
  print(f"{'in new shards':<36} {'shard by shard':>15} {'whole on host':>15}")
  rows = [
    ("bytes per device after the restore", "device_bytes_after"),
    ("re-lay program per device (XLA)", "relayout_device_bytes"),
    ("process peak RSS above its start", "host_peak_above_start"),
  ]
  # On CPU the devices' buffers are host memory: what the process holds beyond
  # them at its peak (the re-lay's, or the placed memory's) is the host's own.
  for r in (new, old):
    devices = r.get("relayout_device_bytes", r["device_bytes_after"]) * args.n_new
    r["host_beyond_devices"] = r["host_peak_above_start"] - devices
  rows.append(("  of which beyond the devices' peak", "host_beyond_devices"))
  for name, key in rows:
    a = new.get(key)
    b = old.get(key)
    fmt = lambda v: f"{v / shard:15.2f}" if v is not None else f"{'-':>15}"
    print(f"{name:<36} {fmt(a)} {fmt(b)}")
  return new, old


if __name__ == "__main__":
  main()
