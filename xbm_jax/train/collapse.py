"""Warnings after an evaluation for a run that trains without failing but has
stopped learning: Recall@1 below chance, or embeddings collapsed to a point.

A too large learning rate (`--config.optim.lr=1e3` on `glyphs:smoke`) does this: the
loss stays finite, every embedding points the same way, and R@1 ends near chance.
The warnings go to the log (`WARNING: ...` above the progress bar) and to
TensorBoard's text tab (`warnings`).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

from xbm_jax.train.guards import COLLAPSE_COSINE, mean_pairwise_cosine

log = logging.getLogger("xbm_jax.train")
# "Below chance" means below by more than this many binomial standard deviations of
# a random order's R@1 over the queries, so a small test set's noise is no alarm.
NOISE_STDS = 3.0


def chance_recall_at_1(query_labels, gallery_labels, *, leave_one_out: bool) -> float:
  """Expected R@1 of a random ranking: for each query, the share of its gallery that
  has its label (itself left out for leave-one-out), averaged over queries.

  Args:
    query_labels: int [Q]. gallery_labels: int [G] (the same array for leave-one-out).
  """
  q, g = np.asarray(query_labels), np.asarray(gallery_labels)
  classes, counts = np.unique(g, return_counts=True)
  pos = np.searchsorted(classes, q)
  found = (pos < len(classes)) & (classes[np.minimum(pos, len(classes) - 1)] == q)
  same = np.where(found, counts[np.minimum(pos, len(classes) - 1)], 0).astype(np.float64)
  self_count = 1 if leave_one_out else 0
  return float(np.mean((same - self_count) / max(len(g) - self_count, 1)))


def collapse_warnings(
  evaluators: Mapping, names: Sequence[str], metrics: Mapping, embedded: Mapping, step: int
) -> list[str]:
  """The warnings an evaluation round calls for (see `warn_after_evaluation`)."""
  out = []
  for name in names:
    splits = evaluators[name].retrieval_splits()
    r1 = metrics.get(f"eval/{name}/recall@1")
    if splits is None or r1 is None or not all(s in embedded for s in splits):
      continue
    q, g = splits
    chance = chance_recall_at_1(embedded[q]["labels"], embedded[g]["labels"], leave_one_out=q == g)
    if r1 < chance - NOISE_STDS * np.sqrt(chance * (1 - chance) / len(embedded[q]["labels"])):
      out.append(
        f"step {step}: {name} R@1 {r1:.4f} is below chance ({chance:.4f}): the model "
        "ranks worse than a random order; check the learning rate (--config.optim.lr)"
      )
  for split in sorted(embedded):
    cos = mean_pairwise_cosine(embedded[split]["emb"])
    if cos > COLLAPSE_COSINE:
      out.append(
        f"step {step}: the {split!r} embeddings have collapsed to a point (mean pairwise "
        f"cosine {cos:.4f}); check the learning rate (--config.optim.lr)"
      )
  return out


def warn_after_evaluation(
  evaluators: Mapping,
  names: Sequence[str],
  metrics: Mapping,
  embedded: Mapping,
  step: int,
  *,
  writer=None,
) -> list[str]:
  """Logs each collapse warning and writes it to TensorBoard's text tab.

  Args:
    evaluators: name -> `xbm_jax.evaluation.evaluators.Evaluator`; names: those that ran.
    metrics: their results (`eval/<name>/recall@1`, ...).
    embedded: split -> {"emb": [N, D] float, "labels": [N] int} of this round.
    step: the step evaluated. writer: a `MetricWriter` or None.

  Returns:
    The warnings (empty when the evaluation looks sane).
  """
  warnings = collapse_warnings(evaluators, names, metrics, embedded, step)
  for line in warnings:
    log.warning(line)
    if writer is not None:
      writer.write_text(step, "warnings", line)
  return warnings
