"""Periodic evaluation inside the training loop: the configured evaluators, the
drift probe embeddings, and the retrieval pictures.

Each eval round embeds every split it needs once (cached for that round), so
several evaluators and the pictures share one extraction.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from xbm_jax import parallel
from xbm_jax.data import pipeline, transforms
from xbm_jax.evaluation import evaluators as evaluators_lib, metrics as metrics_lib
from xbm_jax.evaluation.extract import extract
from xbm_jax.insight import pictures
from xbm_jax.train import collapse, setup, step as step_lib
from xbm_jax.train.errors import NonFiniteError

log = logging.getLogger("xbm_jax.train")
# How each metric reads on the one results line.
SHORT = (("recall@", "R@"), ("map@r", "MAP@R"), ("precision@1", "P@1"), ("r_precision", "RP"))


def due(config, done: int, total: int) -> list[str]:
  """The evaluators that run after update `done`: every `every_steps` updates
  (default: only at the end) and after the last one."""
  return [
    name
    for name, ev in config.evals.items()
    if done % int(ev.get("every_steps", total)) == 0 or done == total
  ]


class EvalRunner:
  """Runs evaluators by schedule; embeds images with the current state."""

  def __init__(
    self,
    config,
    model,
    mesh,
    *,
    train_src,
    writer,
    workdir: str,
    say: Optional[Callable[[str], None]] = None,
  ):
    self.config, self.mesh, self.writer, self.workdir = config, mesh, writer, workdir
    self.say = say or log.info
    self.embed = step_lib.make_embed_fn(model, mesh)
    # Pooled features, for a memory that stores them (xbm.reprojection).
    self.embed_features = step_lib.make_embed_fn(model, mesh, method="features")
    self.evaluators = {
      name: evaluators_lib.create(name, cfg, mesh=mesh) for name, cfg in config.evals.items()
    }
    self.tcfg = transforms.TransformConfig.from_config(config.input.transform)
    # {name: [Q] bool}: the per-query hits@k of the last round, for the paired guard
    # (which asks for them per round: `run(..., hits_of=...)`).
    self.hits: dict[str, np.ndarray] = {}
    self.probe = None
    if config.drift.enabled:
      idx = setup.probe_indices(len(train_src), int(config.drift.probe_size), int(config.seed))
      self.probe = np.stack(
        [transforms.eval_transform(np.asarray(train_src[int(i)]["image"]), self.tcfg) for i in idx]
      )

  def _variables(self, state):
    return {"params": state.params, "batch_stats": state.batch_stats}

  def embed_rows(
    self, state, n: int, load: Callable[[np.ndarray], np.ndarray], *, features: bool = False
  ) -> np.ndarray:
    """Eval-mode embeddings `[n, D]` float32 of rows `0..n-1`, whole on every process
    (`features`: the pooled features `[n, F]` instead).

    `load(rows) -> uint8 [len(rows), H, W, C]` gives images by row. Each process loads
    and embeds only the rows of its own devices (the batch is padded to the mesh
    size); the rows are then gathered from all processes (`process_allgather`):
    a global array cannot be `device_get` by one process.
    """
    sharding = parallel.batch_sharded(self.mesh)
    total = n + (-n) % self.mesh.size
    blocks = sorted(
      {
        (sl[0].start or 0, sl[0].stop or total)
        for sl in sharding.addressable_devices_indices_map((total,)).values()
      }
    )
    mine = np.concatenate([np.arange(a, b) for a, b in blocks])
    images = load(np.minimum(mine, n - 1))  # padding repeats the last row
    x = parallel.global_batch({"image": images}, self.mesh)["image"]
    emb = (self.embed_features if features else self.embed)(self._variables(state), x)
    return np.asarray(multihost_utils.process_allgather(emb, tiled=True))[:n]

  def embed_images(self, state, images: np.ndarray) -> np.ndarray:
    """`[N, H, W, C]` uint8, the same on every process -> `[N, D]` float32 (host)."""
    return self.embed_rows(state, len(images), lambda rows: images[rows])

  def embed_probe(self, state) -> np.ndarray:
    return self.embed_images(state, self.probe)

  def prefill(self, state, source, *, size: int, seed: int, features: bool = False):
    """A full memory of eval-mode embeddings of `size` random training images
    from the current model (the paper's initialisation after warm-up); with
    `features`, their pooled features (a re-projection memory).

    Every process draws the same images; each loads and embeds its devices' share
    (`embed_rows`). Returns a replicated-layout host `MemoryState` (numpy), oldest
    first, the same on every process; where the state's memory stores ids, each
    row's id is its record index in `source` (the train batches' "index").
    """
    rng = np.random.default_rng(seed)
    n = min(size, len(source))
    idx = rng.choice(len(source), size=n, replace=False)
    labels = np.asarray(source.labels)[idx].astype(np.int32)  # no image decoded
    chunk = int(self.config.input.eval_batch_size)

    def read(indices):  # one batched read where the source has it (tfds does)
      many = getattr(source, "__getitems__", None)
      return many(indices) if many else [source[i] for i in indices]

    load = lambda lo: (
      lambda rows: np.stack(
        [
          transforms.eval_transform(np.asarray(rec["image"]), self.tcfg)
          for rec in read([int(idx[lo + r]) for r in rows])
        ]
      )
    )
    emb = [
      self.embed_rows(state, min(chunk, n - lo), load(lo), features=features)
      for lo in range(0, n, chunk)
    ]
    mem = state.memory  # shapes and dtypes only: no fetch of a global array
    out_emb = np.zeros((size,) + mem.emb.shape[1:], mem.emb.dtype)
    out_emb[:n] = np.concatenate(emb).astype(mem.emb.dtype)
    out_labels = np.zeros((size,), np.int32)
    out_labels[:n] = labels
    valid = np.arange(size) < n
    ids = None
    if mem.ids is not None:  # the images' record indices: the train batches' ids
      ids = np.full((size,), -1, np.int32)
      ids[:n] = idx
    return type(mem)(out_emb, out_labels, valid, np.asarray(n % size, np.int32), ids)

  def run(self, names: list[str], state, step: int, *, hits_of: Optional[dict] = None) -> dict:
    variables = self._variables(state)
    cache, sources = {}, {}

    def embed_fn(images):
      return self.embed(variables, parallel.global_batch({"image": images}, self.mesh)["image"])

    def embed_split(split: str) -> dict:
      if split not in cache:
        sources[split] = setup.load_source(self.config.input, split)
        batches = pipeline.eval_batches(
          sources[split],
          batch_size=int(self.config.input.eval_batch_size),
          transform_cfg=self.tcfg,
          process_index=jax.process_index(),
          process_count=jax.process_count(),
          worker_count=self.config.input.worker_count,
        )
        # embed_fn lays this process's batch out over its devices; extract gathers the
        # processes' parts, so every process scores the whole split (see extract).
        cache[split] = check_finite(extract(embed_fn, batches), split, step)
      return cache[split]

    metrics = {}
    for name in names:
      t0 = time.time()
      self.say(f"evaluating {name} ({self._num_images(name):,} images)...")
      res = self.evaluators[name].run(embed_split)
      self.say(results_line(name, step, res, time.time() - t0))
      metrics.update(res)
    self.hits = {
      n: query_hits(self.evaluators[n], embed_split, k=k, mesh=self.mesh)
      for n, k in (hits_of or {}).items()
      if n in names
    }
    self.writer.write_scalars(step, metrics)
    collapse.warn_after_evaluation(self.evaluators, names, metrics, cache, step, writer=self.writer)
    self._pictures(names, embed_split, sources, step)
    return metrics

  def _num_images(self, name: str) -> int:
    splits = set(self.evaluators[name].split_names())
    return sum(len(setup.load_source(self.config.input, s)) for s in splits)

  def _pictures(self, names, embed_split, sources, step):
    pc = self.config.pictures
    name = pc.evaluator or (names[0] if names else "")
    if not pc.enabled or name not in names or jax.process_index() != 0:
      return
    qs, gs = self.evaluators[name].picture_splits()
    q, g = embed_split(qs), embed_split(gs)
    chosen = pictures.choose_queries(int(pc.num_queries), len(q["labels"]), int(pc.seed))
    self_index = chosen if qs == gs else None
    topk, correct = pictures.retrieve(
      q["emb"][chosen],
      g["emb"],
      q["labels"][chosen],
      g["labels"],
      k=int(pc.top_k),
      self_index=self_index,
    )
    load = lambda split, rows: [
      np.asarray(sources[split][int(i)]["image"]) for i in embed_split(split)["index"][rows]
    ]
    q_img = load(qs, chosen)
    g_rows = np.unique(topk)
    g_img = load(gs, g_rows)
    remap = np.searchsorted(g_rows, topk)
    title = pictures.run_title(self.workdir, name, step)
    grid = pictures.retrieval_grid(
      _same_size(q_img), _same_size(g_img), remap, correct, title=title
    )
    out = os.path.join(self.workdir, "pictures", f"retrieval_{name}_{step:07d}.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    pictures.save_png(out, grid)
    self.writer.write_image(step, f"eval/{name}/retrieval", grid)


def query_hits(evaluator, embed_split: Callable, *, k: int, mesh=None) -> np.ndarray:
  """`[Q]` bool: whether each query of `evaluator` (one query split against one
  gallery) has a positive in its top k, in query order; queries without a positive
  in the gallery left out (as its Recall@k leaves them out)."""
  q_split, g_split = evaluator.retrieval_splits()
  q = embed_split(q_split)
  g = q if g_split == q_split else embed_split(g_split)
  res = metrics_lib.retrieval_metrics(
    q["emb"],
    q["labels"],
    None if g is q else g["emb"],
    None if g is q else g["labels"],
    ks=(k,),
    self_exclude=g is q,
    map_at_r=False,
    mesh=mesh,
    per_query=True,
  )
  return (res["rank"] < k)[res["valid"]]


def check_finite(out: dict, split: str, step: int) -> dict:
  """Refuses NaN/inf embeddings: ranked, they would score as perfect retrieval."""
  bad = ~np.isfinite(out["emb"]).all(axis=1)
  if bad.any():
    raise NonFiniteError(
      f"step {step}: {int(bad.sum())} of {len(bad)} embeddings of split "
      f"{split!r} are NaN/inf (the weights are broken); not evaluating"
    )
  return out


def results_line(name: str, step: int, res: dict, seconds: float) -> str:
  """`"glyphs @ step 400: R@1 0.7375  R@2 0.8200  MAP@R 0.4100  (12.3 s)"`."""
  parts = []
  for key, value in res.items():
    metric = key.rsplit("/", 1)[-1]
    if metric.startswith("num_"):
      continue
    label = key[len(f"eval/{name}/") :]
    for long, short in SHORT:
      label = label.replace(long, short)
    parts.append(f"{label} {value:.4f}")
  return f"{name} @ step {step}: " + "  ".join(parts) + f"  ({seconds:.1f} s)"


def _same_size(images: list, size: int = 96) -> np.ndarray:
  """Images to one common square size for the grid (source images vary in size)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  shapes = {im.shape for im in images}
  if len(shapes) == 1 and max(next(iter(shapes))[:2]) <= size:
    return np.stack(images)
  squeeze = lambda im: im[..., 0] if im.ndim == 3 and im.shape[-1] == 1 else im
  return np.stack([np.asarray(Image.fromarray(squeeze(im)).resize((size, size))) for im in images])
