"""Inference figures, as ratios measured in one run (docs/search.md quotes one).

    python benchmarks/inference.py                       # 1M x 128 gallery (~0.5 GB)
    python benchmarks/inference.py --gallery 200000 --images 512

1. Embedding throughput of `Embedder.embed_source` against evaluation's own path
   (`pipeline.eval_batches` + `extract` + `step.make_embed_fn`, as `EvalRunner` embeds a
   split), the same images and model, best of `--repeats` warm runs each, interleaved.
   Target >= 0.95x.
2. Exact top-k of `--queries` queries against a `--gallery` x `--dim` gallery: our
   sharded search against `faiss.IndexFlatIP` (when faiss is installed), warm, best of
   `--repeats`; the neighbours must be identical except between equal scores. Target
   <= 1.0x faiss's time.
3. Peak host memory of building an index (adding the embeddings in parts, then saving
   it), traced by `tracemalloc`, over the embeddings' bytes. Target <= 1.5x.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xbm_jax import models, parallel  # noqa: E402
from xbm_jax.data import pipeline  # noqa: E402
from xbm_jax.evaluation.extract import extract  # noqa: E402
from xbm_jax.inference import search as search_lib  # noqa: E402
from xbm_jax.inference.embedder import Embedder  # noqa: E402
from xbm_jax.inference.index import Index  # noqa: E402
from xbm_jax.train import config as config_lib, step as step_lib  # noqa: E402


def best_of(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def embedding_ratio(a) -> str:
  cfg = config_lib.base()
  cfg.model.name, cfg.model.embed_dim, cfg.model.dtype = a.model, 128, "auto"
  cfg.input.transform.resize, cfg.input.transform.crop = a.crop + a.crop // 7, a.crop
  cfg.input.eval_batch_size = a.batch
  model = models.create(cfg.model, axis_name=parallel.DATA_AXIS)
  variables = models.init_variables(model, jax.random.key(0), image_size=a.crop)
  variables = jax.tree.map(np.asarray, variables)
  rng = np.random.default_rng(0)
  side = a.crop + a.crop // 4
  images = rng.integers(0, 256, size=(a.images, side, side, 3), dtype=np.uint8)
  source = [{"image": im, "label": i % 10, "index": i} for i, im in enumerate(images)]
  emb = Embedder(cfg, variables)
  mesh = parallel.make_mesh()
  embed = step_lib.make_embed_fn(model, mesh)
  rep = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))

  def evaluation_path():  # EvalRunner.run's embed_split, minus the tfds read
    batches = pipeline.eval_batches(source, batch_size=a.batch, transform_cfg=emb.tcfg)
    fn = lambda x: embed(rep, parallel.global_batch({"image": x}, mesh)["image"])  # noqa: E731
    return extract(fn, batches)

  ours = lambda: emb.embed_source(source)  # noqa: E731
  np.testing.assert_allclose(ours()["emb"], evaluation_path()["emb"], atol=1e-6)  # + warm-up
  t_eval, t_ours = [], []
  for _ in range(a.repeats):
    t_eval.append(best_of(evaluation_path, 1))
    t_ours.append(best_of(ours, 1))
  te, to = min(t_eval), min(t_ours)
  return (
    f"embedding: {a.images} images {a.model} crop {a.crop}, {jax.device_count()} "
    f"{jax.default_backend()} device(s): evaluation path {a.images / te:.1f} img/s, "
    f"embedder {a.images / to:.1f} img/s -> {te / to:.3f}x (target >= 0.95x)"
  )


def search_ratio(a) -> list[str]:
  rng = np.random.default_rng(1)
  g = rng.standard_normal((a.gallery, a.dim), dtype=np.float32)
  g /= np.linalg.norm(g, axis=1, keepdims=True)
  q = rng.standard_normal((a.queries, a.dim), dtype=np.float32)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  t0 = time.perf_counter()
  ours = search_lib.ExactSearcher(g)
  t_put = time.perf_counter() - t0
  ours.search(q, a.k)  # compile
  t_ours = best_of(lambda: ours.search(q, a.k), a.repeats)
  v1, r1 = ours.search(q, a.k)
  lines = [
    f"search: {a.queries} queries x {a.gallery:,} x {a.dim} gallery, k={a.k}, "
    f"{jax.device_count()} {jax.default_backend()} device(s): exact {t_ours:.3f} s "
    f"({a.queries / t_ours:.0f} q/s; gallery to devices {t_put:.2f} s once)"
  ]
  if not search_lib.faiss_available():
    return lines + ["faiss: not installed (pip install faiss-cpu==1.15.1): no ratio"]
  import faiss  # pylint: disable=g-import-not-at-top

  fs = search_lib.FaissSearcher(g)
  t_faiss = best_of(lambda: fs.index.search(q, a.k), a.repeats)
  v2, r2 = fs.search(q, a.k)
  differ = r1 != r2
  ties = np.abs(v1 - v2) <= 1e-6  # a different neighbour at an equal (tied) score
  lines.append(
    f"faiss IndexFlatIP ({faiss.omp_get_max_threads()} threads) {t_faiss:.3f} s -> "
    f"exact / faiss time {t_ours / t_faiss:.3f}x (target <= 1.0x); neighbours differing: "
    f"{int(differ.sum())} of {differ.size}, all at tied scores: {bool(ties[differ].all())}, "
    f"max |score diff| {np.abs(v1 - v2).max():.2e}"
  )
  return lines


def memory_ratio(a) -> str:
  n, d, part = a.gallery, a.dim, max(1, a.gallery // 16)
  rng = np.random.default_rng(2)
  tracemalloc.start()
  index = Index(d)
  for lo in range(0, n, part):  # as xbm-embed adds each embedded part
    rows = min(part, n - lo)
    index.add(rng.standard_normal((rows, d), dtype=np.float32), labels=np.arange(rows) % 100)
  with tempfile.TemporaryDirectory() as tmp:
    index.save(os.path.join(tmp, "g.npz"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    size = os.path.getsize(os.path.join(tmp, "g.npz"))
  emb_bytes = n * d * 4
  return (
    f"index build: {n:,} x {d} in {-(-n // part)} parts + save ({size / 2**20:.0f} MiB file): "
    f"peak traced host memory {peak / 2**20:.0f} MiB = {peak / emb_bytes:.3f}x the "
    f"embeddings' {emb_bytes / 2**20:.0f} MiB (target <= 1.5x)"
  )


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--gallery", type=int, default=1_000_000)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--images", type=int, default=2048, help="images for the embedding ratio")
  p.add_argument("--model", default="resnet18")
  p.add_argument("--crop", type=int, default=64)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args(argv)
  lines = [embedding_ratio(a)]
  print(lines[-1], flush=True)
  for line in search_ratio(a):
    lines.append(line)
    print(line, flush=True)
  lines.append(memory_ratio(a))
  print(lines[-1], flush=True)
  return lines


if __name__ == "__main__":
  main()
