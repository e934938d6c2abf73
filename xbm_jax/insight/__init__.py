"""Insight into training: feature drift, the memory controller, retrieval pictures.

The report (``xbm_jax.insight.report``) is imported on its own: it pulls in matplotlib.
"""

from xbm_jax.insight.controller import NEVER, MemoryController, span_drift
from xbm_jax.insight.drift import DriftMonitor, mean_cosine_drift, parse_drift_metrics
from xbm_jax.insight.pictures import choose_queries, retrieval_grid, retrieve, save_png

__all__ = [
  "NEVER",
  "DriftMonitor",
  "MemoryController",
  "choose_queries",
  "mean_cosine_drift",
  "parse_drift_metrics",
  "retrieval_grid",
  "retrieve",
  "save_png",
  "span_drift",
]
