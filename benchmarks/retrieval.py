"""SOP-sized leave-one-out retrieval: our exact blockwise metrics vs the bare matmul vs faiss.

    python benchmarks/retrieval.py                 # 60,502 x 128, 11,316 classes
    python benchmarks/retrieval.py --n 8000 --classes 1500   # quick look

Measures, in one process and on the same data (random clustered unit vectors, classes of
2 + Poisson(3.35) images like SOP's test set):
  floor : the bare N x N x D matmul, in query blocks of the same size through the same XLA
          dot (every exact method must compute it); output written, nothing else;
  ours  : `retrieval_metrics` end to end (host prep, R@{1,10,100,1000}, MAP@R);
  faiss : (if faiss-cpu is installed) IndexFlatIP kNN with k = 1000 + 1 (self), then the
          same metrics from the lists, checked against ours.
Times (wall and process CPU) are the best of --reps runs, floor and ours interleaved so
both see the same machine load; peak memory is the largest RSS increase over the run's start, sampled every 5 ms.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from xbm_jax.evaluation import metrics  # noqa: E402

KS = (1, 10, 100, 1000)


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
  """Context manager sampling RSS; `.peak` is the largest increase over the start."""

  def __enter__(self):
    self.start = rss_bytes()
    self.peak = 0
    self._stop = threading.Event()

    def loop():
      while not self._stop.is_set():
        self.peak = max(self.peak, rss_bytes() - self.start)
        time.sleep(0.005)

    self._thread = threading.Thread(target=loop, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes() - self.start)


def make_data(n, classes, dim, noise, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.concatenate(
    [np.repeat(np.arange(classes), 2), rng.integers(0, classes, n - 2 * classes)]
  )
  rng.shuffle(labels)
  centers = rng.standard_normal((classes, dim)).astype(np.float32)
  x = centers[labels] + noise * rng.standard_normal((n, dim)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32), labels


def floor(x, block):
  """The bare blockwise matmul through the same XLA dot as ours."""
  f = jax.jit(
    lambda q, g: jax.lax.dot_general(
      q, g, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST
    )
  )
  g = jnp.asarray(x)
  n = x.shape[0]
  rows = -(-n // block) * block
  q = np.zeros((rows, x.shape[1]), np.float32)
  q[:n] = x
  f(jnp.asarray(q[:block]), g).block_until_ready()  # compile outside the timing
  t, c = time.perf_counter(), time.process_time()
  for s in range(0, rows, block):
    out = f(jnp.asarray(q[s : s + block]), g)
    out.block_until_ready()  # one [block, N] output alive at a time
    del out
  return time.perf_counter() - t, time.process_time() - c


def faiss_metrics(x, labels, kmax):
  import faiss  # optional

  index = faiss.IndexFlatIP(x.shape[1])
  index.add(x)
  _, nn = index.search(x, kmax + 1)
  n = x.shape[0]
  # Drop self by index; keep the first kmax others.
  keep = nn != np.arange(n)[:, None]
  order = np.argsort(~keep, axis=1, kind="stable")[:, :kmax]
  nn = np.take_along_axis(nn, order, axis=1)
  rel = labels[nn] == labels[:, None]
  counts = np.bincount(labels)[labels] - 1
  valid = counts > 0
  first = np.where(rel.any(axis=1), np.argmax(rel, axis=1), kmax)
  res = {f"recall@{k}": float(np.mean(first[valid] < k)) for k in KS}
  r = counts[:, None]
  pos = np.arange(kmax)[None, :]
  top = rel & (pos < r)
  prec = np.cumsum(top, axis=1) / (pos + 1)
  ap = np.sum(prec * top, axis=1) / np.maximum(counts, 1)
  res["map@r"] = float(np.mean(ap[valid]))
  res["r_precision"] = float(np.mean((top.sum(axis=1) / np.maximum(counts, 1))[valid]))
  return res, np.where(valid, first, -1)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=60502)
  ap.add_argument("--classes", type=int, default=11316)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument(
    "--noise",
    type=float,
    default=1.5,
    help="per-dimension noise std around unit-variance class centers",
  )
  ap.add_argument("--block", type=int, default=1024)
  ap.add_argument("--reps", type=int, default=1)
  ap.add_argument("--no-faiss", action="store_true")
  args = ap.parse_args()

  x, labels = make_data(args.n, args.classes, args.dim, args.noise)
  print(f"data: {args.n} x {args.dim}, {args.classes} classes, devices {jax.devices()}", flush=True)
  run = lambda: metrics.retrieval_metrics(
    x, labels, ks=KS, self_exclude=True, map_at_r=True, block_size=args.block, per_query=True
  )
  # Warm-up (compilation) on the real shapes, outside the timing.
  run()
  t_floor, t_ours, mem_floor, mem_ours = [], [], 0, 0
  for _ in range(args.reps):
    with PeakRSS() as m:
      t_floor.append(floor(x, args.block))
    mem_floor = max(mem_floor, m.peak)
    with PeakRSS() as m:
      t, c = time.perf_counter(), time.process_time()
      ours = run()
      t_ours.append((time.perf_counter() - t, time.process_time() - c))
    mem_ours = max(mem_ours, m.peak)
  tf, cf = (min(v) for v in zip(*t_floor))
  to, co = (min(v) for v in zip(*t_ours))
  mib = 2**20
  print("wall s / CPU s (all threads); the CPU time is the fairer figure on a shared host")
  print(
    f"floor  matmul   {tf:8.2f} / {cf:8.2f}   peak +{mem_floor / mib:6.0f} MiB   (all: "
    f"{', '.join(f'{t:.1f}/{c:.1f}' for t, c in t_floor)})"
  )
  print(
    f"ours   metrics  {to:8.2f} / {co:8.2f}   peak +{mem_ours / mib:6.0f} MiB   ratio to "
    f"floor {to / tf:.3f} wall, {co / cf:.3f} CPU   (all: "
    f"{', '.join(f'{t:.1f}/{c:.1f}' for t, c in t_ours)})"
  )
  print(f"N x N float32 would be {args.n**2 * 4 / mib:.0f} MiB")
  shown = {k: v for k, v in ours.items() if k not in ("rank", "valid", "ap")}
  print("ours  ", shown, flush=True)

  if args.no_faiss:
    return
  try:
    import faiss
  except ImportError:
    print("faiss not installed: skipped")
    return
  with PeakRSS() as m:
    t, c = time.perf_counter(), time.process_time()
    theirs, first = faiss_metrics(x, labels, max(KS))
    t_faiss, c_faiss = time.perf_counter() - t, time.process_time() - c
  print(
    f"faiss  {faiss.__version__} flat IP k={max(KS)}  {t_faiss:8.2f} / {c_faiss:8.2f}   "
    f"peak +{m.peak / mib:6.0f} MiB   ratio to floor {t_faiss / tf:.3f} wall, "
    f"{c_faiss / cf:.3f} CPU;  ours/faiss {to / t_faiss:.3f} wall, {co / c_faiss:.3f} CPU"
  )
  print("faiss ", theirs)
  diffs = {k: abs(ours[k] - theirs[k]) for k in theirs}
  ours_first = np.minimum(ours["rank"], max(KS))
  n_disagree = int(np.sum(ours_first != first))
  print(
    f"max |ours - faiss| = {max(diffs.values()):.2e}; queries whose first-positive "
    f"rank (capped at {max(KS)}) differs: {n_disagree}"
  )


if __name__ == "__main__":
  main()
