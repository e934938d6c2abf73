"""Insight into training: feature drift and retrieval pictures (reports, no policy).

The report (``xbm_jax.insight.report``) is imported on its own: it pulls in matplotlib.
The memory controller that acts on drift lives in ``xbm_jax.control``.
"""

from xbm_jax.insight.drift import DriftMonitor, mean_cosine_drift, parse_drift_metrics
from xbm_jax.insight.pictures import choose_queries, retrieval_grid, retrieve, save_png

__all__ = [
  "DriftMonitor",
  "choose_queries",
  "mean_cosine_drift",
  "parse_drift_metrics",
  "retrieval_grid",
  "retrieve",
  "save_png",
]
