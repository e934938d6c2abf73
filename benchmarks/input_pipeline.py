r"""Input pipeline throughput: images/s of the SOP-like train pipeline, 0 / 1 / 2 workers.

  python benchmarks/input_pipeline.py [--images 200] [--batches 20] [--workers 0,1,2]

Writes ~500x500 JPEGs (smooth random images, closer to photos than white noise) to a
temporary folder and reads them through a file-backed source: JPEG decode -> resize 256 ->
RandomResizedCrop 224 (scale 0.2-1) -> flip, batches of P x K = 16 x 4 from
``xbm_jax.data.pipeline.train_batches``. Worker start-up (process spawn, first batch) is
excluded from the timing. Also checks that every worker count yields the same batches.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xbm_jax.data import pipeline  # noqa: E402  pylint: disable=g-import-not-at-top


class JpegFolderSource:
  """File-backed source: record i decodes ``paths[i]`` (uint8 [H, W, 3])."""

  def __init__(self, paths, labels):
    self.paths = list(paths)
    self.labels = np.asarray(labels, np.int64)
    self.num_classes = len(np.unique(self.labels))

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    with Image.open(self.paths[int(i)]) as im:
      image = np.asarray(im.convert("RGB"))
    return {"image": image, "label": int(self.labels[int(i)]), "index": int(i)}


def write_jpegs(folder: str, n: int, seed: int = 0) -> JpegFolderSource:
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(n):
    h, w = (int(v) for v in rng.integers(440, 560, size=2))
    low = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    path = os.path.join(folder, f"{i:05d}.jpg")
    Image.fromarray(img).save(path, quality=90)
    paths.append(path)
  return JpegFolderSource(paths, np.arange(n) // 4)  # classes of 4 images


def measure(source, workers: int, batches: int):
  it = pipeline.train_batches(
      source, sampler={"classes_per_batch": 16, "samples_per_class": 4},
      transform_cfg={"resize": 256, "crop": 224, "flip": True}, global_batch_size=64,
      worker_count=workers, seed=0)
  first = next(it)  # includes worker start-up
  t0, c0 = time.perf_counter(), time.process_time()
  last = None
  for _ in range(batches):
    last = next(it)
  dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  it.close()
  # CPU ms per image of this process: the whole cost with 0 workers (less sensitive to
  # other load on the machine than wall time), only the hand-off with workers.
  return batches * 64 / dt, 1e3 * cpu / (batches * 64), first, last


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=200)
  p.add_argument("--batches", type=int, default=20)
  p.add_argument("--workers", default="0,1,2")
  args = p.parse_args()
  print(f"cpus: {os.cpu_count()}")
  with tempfile.TemporaryDirectory() as d:
    src = write_jpegs(d, args.images)
    mb = sum(os.path.getsize(x) for x in src.paths) / 2**20
    print(f"{len(src)} JPEGs ({mb:.1f} MiB) in {d}")
    ref = None
    for w in (int(x) for x in args.workers.split(",")):
      ips, cpu_ms, first, last = measure(src, w, args.batches)
      same = "" if ref is None else (
          "same batches as 0 workers" if np.array_equal(first["image"], ref[0]["image"])
          and np.array_equal(last["image"], ref[1]["image"]) else "BATCHES DIFFER")
      ref = ref or (first, last)
      print(f"workers={w}: {ips:7.1f} images/s total, {ips / max(w, 1):7.1f} per worker "
            f"(main process {cpu_ms:.1f} CPU ms/image; {args.batches} batches of 64, "
            f"224x224x3) {same}")


if __name__ == "__main__":
  main()
