"""Embedding extraction over an evaluation split: padded batches in, host arrays out.

Multi-host: each process reads its own contiguous part of the split
(`pipeline.eval_batches(process_index=...)`), embeds it on its own devices and
fetches only its own rows (`addressable_shards`: a global array spans devices
other processes own, so `device_get` of it fails). The parts are then gathered
with `process_allgather`, so every process holds the whole split's embeddings
in split order. Why gather rather than keep the gallery sharded: the host copy
is small next to the images (1M x 512 float32 = 2 GB per host), the metrics
then lay the gallery out over all devices of all hosts anyway
(`retrieval_metrics` with the global mesh: each device scores `Ng / devices`
rows), and the pictures and per-query results need host arrays.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from xbm_jax.data import pipeline


def local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order (all rows when the array
  is fully addressable). Replicas of one row block are taken once."""
  if getattr(x, "is_fully_addressable", True):  # numpy, or one process
    return np.asarray(jax.device_get(x))
  blocks = {}
  for shard in x.addressable_shards:
    blocks.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])


def gather_processes(parts: dict) -> dict:
  """Concatenates every process's `{name: [n_p, ...]}` in process order (n_p may
  differ); identity with one process."""
  if jax.process_count() == 1:
    return parts
  counts = multihost_utils.process_allgather(np.int32(len(parts["labels"])))
  most = int(np.max(counts))
  out = {}
  for key, x in parts.items():
    padded = np.zeros((most,) + x.shape[1:], x.dtype)
    padded[: len(x)] = x
    everyone = np.asarray(multihost_utils.process_allgather(padded))  # [P, most, ...]
    out[key] = np.concatenate([everyone[p, : int(c)] for p, c in enumerate(counts)])
  return out


def _consume(embed_fn, batches, embs, labels, index, masks):
  """Dispatches every batch to `embed_fn`, collecting per-batch outputs in the lists."""
  for i, batch in enumerate(batches):
    for key in ("image", "label", "mask"):
      if key not in batch:
        raise KeyError(f"batch {i} has no {key!r}; keys: {sorted(batch)}")
    mask = np.asarray(batch["mask"]).astype(bool)
    b = mask.shape[0]
    if np.shape(batch["image"])[0] != b or np.shape(batch["label"])[0] != b:
      raise ValueError(
        f"batch {i}: image {np.shape(batch['image'])}, label "
        f"{np.shape(batch['label'])} and mask {mask.shape} disagree on b"
      )
    # Dispatch now, fetch later: the device embeds batch i while the host loads i + 1.
    embs.append(embed_fn(batch["image"]))  # placed on the mesh already
    masks.append(mask)
    labels.append(np.asarray(batch["label"]).astype(np.int64)[mask])
    if "index" in batch:
      index.append(np.asarray(batch["index"]).astype(np.int64)[mask])


def extract(
  embed_fn: Callable,
  batches: Iterable[Mapping],
  *,
  prefetch: int = 2,
  across_processes: bool = True,
) -> dict:
  """Embeds every real record of a split.

  Args:
    embed_fn: `images [b, H, W, C] -> embeddings [b, D]`, taking host images (the
      trainer's closes over the parameters and lays each batch out over its mesh with
      `parallel.global_batch`, the one host-to-mesh path).
    batches: iterator of dicts `{"image": uint8 [b, H, W, C], "label": int [b],
      "mask": bool [b]}`; the last batch is padded and `mask` is False on padding. A record
      may carry `"index"` (int [b], e.g. its position in the split's list file).
    prefetch: batches read ahead in a background thread, so
      loading overlaps the device's work; 0 reads in this thread.
    across_processes: with several processes, `batches` are this process's part of the
      split (in process order) and the parts of all processes are gathered, so every
      process returns the whole split; every process must call `extract` then.
  Returns:
    `dict(emb=float32 [N, D], labels=int64 [N], index=int64 [N])` on the host, padded rows
    dropped, in iteration order. `index` is the record's own index if batches carry one,
    else its position in the whole (gathered) split.
  """
  embs, labels, index, masks = [], [], [], []
  if prefetch > 0:
    batches = pipeline.prefetch_to_device(iter(batches), lambda b: b, size=prefetch)
  try:
    _consume(embed_fn, batches, embs, labels, index, masks)
  finally:
    if hasattr(batches, "close"):
      batches.close()
  if not embs:
    raise ValueError("extract got no batches")
  out = []
  for i, (e, m) in enumerate(zip(embs, masks)):
    e = np.asarray(local_rows(e), dtype=np.float32)
    if e.ndim != 2 or e.shape[0] != m.shape[0]:
      raise ValueError(
        f"embed_fn returned shape {e.shape} for batch {i} of {m.shape[0]} images; expected [b, D]"
      )
    out.append(e[m])
  mine = dict(emb=np.concatenate(out), labels=np.concatenate(labels))
  if index and len(index) != len(labels):
    raise ValueError("some batches carry 'index' and others do not")
  if index:
    mine["index"] = np.concatenate(index)
  whole = gather_processes(mine) if across_processes else mine
  if not index:  # positions in the whole split, not restarting in each process's part
    whole["index"] = np.arange(len(whole["labels"]), dtype=np.int64)
  return whole
