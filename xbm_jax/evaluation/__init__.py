"""Evaluation: embedding extraction, exact retrieval metrics, protocols, evaluators.

Modules: `extract` (`extract.extract(embed_fn, batches)`), `metrics`
(`retrieval_metrics`, `recall_at_k`, `map_at_r`), `protocols`, `evaluators` (`create`).
"""

from xbm_jax.evaluation import evaluators, extract, metrics, protocols
from xbm_jax.evaluation.evaluators import create
from xbm_jax.evaluation.metrics import map_at_r, recall_at_k, retrieval_metrics

__all__ = [
  "create",
  "evaluators",
  "extract",
  "map_at_r",
  "metrics",
  "protocols",
  "recall_at_k",
  "retrieval_metrics",
]
