r"""Input pipeline throughput per core: training batches and evaluation extraction.

  python benchmarks/input_pipeline.py [--images 200] [--batches 10] [--workers 0,1]

Writes ~500x500 photo-like JPEGs (smooth random images plus grain, quality 90, ~70 KB
like SOP's) and reads them as encoded bytes, as a prepared dataset stores them:
  train: P x K = 16 x 4 batches from ``pipeline.train_batches``: JPEG decode ->
    RandomResizedCrop 224 (scale 0.2-1, on the Resize-256 geometry) -> flip, the
    reference augmentation (``xbm_jax.data.transforms``);
  eval: ``pipeline.eval_batches``: decode -> Resize 256 -> CenterCrop 224, batches of 128.

Per-core rates come from CPU time, not wall time (this machine is shared): with 0
workers every thread of the work runs in this process, so images / CPU-seconds is the
throughput of one busy core. The projection to ``--cores`` assumes one grain worker per
core but one (``worker_count=-1``) and caps it by the main process's own hand-off cost,
measured with workers. Also checks that workers give the same batches.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from xbm_jax.data import pipeline  # noqa: E402  pylint: disable=g-import-not-at-top

SOP_TEST = 60_502
TRAIN_CFG = {"resize": 256, "crop": 224, "flip": True}


class JpegFolderSource:
  """File-backed source: record i is the encoded bytes of ``paths[i]``."""

  def __init__(self, paths, labels):
    self.paths = list(paths)
    self.labels = np.asarray(labels, np.int64)
    self.num_classes = len(np.unique(self.labels))

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    with open(self.paths[int(i)], "rb") as f:
      data = f.read()
    return {"image": data, "label": int(self.labels[int(i)]), "index": int(i)}


def write_jpegs(folder: str, n: int, seed: int = 0, size: int = 500) -> JpegFolderSource:
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    h, w = (int(v) for v in rng.integers(int(size * 0.88), int(size * 1.12), size=2))
    low = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    path = os.path.join(folder, f"{i:05d}.jpg")
    Image.fromarray(img).save(path, quality=90)
    paths.append(path)
  return JpegFolderSource(paths, np.arange(n) // 4)  # classes of 4 images


def _timed(it, batches: int, per_batch: int):
  """(images/s wall, main-process CPU ms per image, first, last) over `batches` batches
  after the first (worker start-up excluded)."""
  first = next(it)
  t0, c0 = time.perf_counter(), time.process_time()
  last = first
  n = 0
  for _ in range(batches):
    try:
      last = next(it)
    except StopIteration:
      break
    n += 1
  dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  close = getattr(it, "close", None)
  if close is not None:
    close()
  n = max(n, 1)
  return n * per_batch / dt, 1e3 * cpu / (n * per_batch), first, last


def train_run(source, workers: int, batches: int):
  it = pipeline.train_batches(
    source,
    sampler={"classes_per_batch": 16, "samples_per_class": 4},
    transform_cfg=TRAIN_CFG,
    global_batch_size=64,
    worker_count=workers,
    seed=0,
  )
  return _timed(it, batches, 64)


def eval_run(source, workers: int, batches: int):
  it = pipeline.eval_batches(source, batch_size=128, transform_cfg=TRAIN_CFG, worker_count=workers)
  return _timed(it, batches, 128)


def project(per_core: float, handoff_ms: float | None, cores: int) -> float:
  workers = max(cores - 1, 1)
  limit = float("inf") if not handoff_ms else 1e3 / handoff_ms
  return min(per_core * workers, limit)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=200)
  p.add_argument("--batches", type=int, default=10)
  p.add_argument("--workers", default="0,1", help="first must be 0 (the per-core figure)")
  p.add_argument("--cores", type=int, default=16, help="cores of the projected machine")
  p.add_argument("--size", type=int, default=500, help="JPEG side, about")
  args = p.parse_args()
  workers = [int(x) for x in args.workers.split(",")]
  assert workers[0] == 0, "--workers must start with 0"
  print(f"cpus here: {os.cpu_count()}  (per-core figures use CPU time: load-independent)")
  with tempfile.TemporaryDirectory() as d:
    src = write_jpegs(d, args.images, size=args.size)
    kb = sum(os.path.getsize(x) for x in src.paths) / 1024 / len(src)
    print(f"{len(src)} JPEGs of ~{args.size}x{args.size}, {kb:.0f} KB each")
    for name, run, nb in (
      ("train", train_run, args.batches),
      ("eval", eval_run, max(args.batches // 2, 1)),
    ):
      per_core, handoff, ref = None, None, None
      for w in workers:
        ips, cpu_ms, first, last = run(src, w, nb)
        same = ""
        if ref is None:
          per_core, ref = 1e3 / cpu_ms, (first, last)
        else:
          handoff = cpu_ms if handoff is None else max(handoff, cpu_ms)
          same = (
            "same batches"
            if np.array_equal(first["image"], ref[0]["image"])
            and np.array_equal(last["image"], ref[1]["image"])
            else "BATCHES DIFFER"
          )
        print(
          f"  {name} workers={w}: {ips:7.1f} img/s wall, main process {cpu_ms:5.2f} "
          f"CPU ms/img {same}"
        )
      proj = project(per_core, handoff, args.cores)
      line = (
        f"{name}: {per_core:6.1f} img/s per core -> {proj:7.0f} img/s projected on "
        f"{args.cores} cores ({args.cores - 1} workers"
      )
      line += f", main-process hand-off {handoff:.2f} ms/img)" if handoff else ")"
      if name == "eval":
        line += f"; SOP test ({SOP_TEST:,} images) in {SOP_TEST / proj:.0f} s"
      print(line)


if __name__ == "__main__":
  main()
