"""Feature drift: how far the embeddings of the same images move between steps.

XBM rests on "slow drift" (paper Sec. 3.2, Fig. 3): an embedding stored in the memory
``span`` steps ago is still a fair stand-in for the current one only if the network
has barely moved. The paper measures it on a fixed set of training images:

    drift(t, delta) = mean_i [ 1 - cos(f_t(x_i), f_{t-delta}(x_i)) ]

and so does :class:`DriftMonitor`: the trainer embeds a fixed probe set (eval mode, no
augmentation, so only the weights change) every ``interval`` steps and hands the
``[P, D]`` result to :meth:`DriftMonitor.update`, which compares it with the snapshots
taken ``delta`` steps earlier.

Cost: one eval-mode forward of ``P`` images every ``interval`` steps, i.e. about
``P / (interval * global_batch)`` of the training forward work (P=1024, interval=100,
batch 64: 16% of the forward images, ~5% of a train step's forward+backward), plus host
memory of ``R * P * D * 4`` bytes for the ring of ``R = max(deltas) / interval + 1``
snapshots (P=1024, D=128, deltas up to 1000 at interval 100: 5.8 MB).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

METRIC_PREFIX = "train/drift@"
# Ranking-relevant drift: how much the probe set's similarity structure
# changed, which a rotation of the whole embedding space leaves at exactly 0.
REL_PREFIX = "train/rel_drift@"
RANK_PREFIX = "train/rank_drift@"
RANK_K = 10


def mean_cosine_drift(a: np.ndarray, b: np.ndarray, *, eps: float = 1e-12) -> float:
  """Mean over rows of ``1 - cos(a_i, b_i)``.

  Args:
    a, b: ``[P, D]`` float arrays, the same P images embedded at two steps (need not be
      unit-norm; each row is normalised here).
    eps: guards the division for an all-zero row (degenerate; it stays zero).

  Returns:
    A Python float in [0, 2]; exactly 0.0 when ``a`` and ``b`` are equal.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(
      f"mean_cosine_drift needs two [P, D] arrays of the same shape, got {a.shape} and {b.shape}"
    )
  if a.shape[0] == 0:
    raise ValueError("mean_cosine_drift got an empty probe set (P = 0)")
  a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), eps)
  b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), eps)
  # For unit rows 1 - cos = |a - b|^2 / 2: exactly 0 for equal rows and free of the
  # cancellation that 1 - (a . b) suffers when the drift is tiny.
  return float(np.mean(0.5 * np.sum((a - b) ** 2, axis=1)))


def _unit(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def relational_drift(a: np.ndarray, b: np.ndarray) -> float:
  """Mean over probe pairs i != j of ``|cos(a_i, a_j) - cos(b_i, b_j)|``.

  What a retrieval ranking and a pair loss see is the similarity between images, not
  the coordinates: any rotation (orthogonal map) of the whole space gives 0 here, while
  :func:`mean_cosine_drift` can be large. ``a``, ``b``: ``[P, D]``, P >= 2.
  """
  a, b = _unit(a), _unit(b)
  if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2:
    raise ValueError(
      f"relational_drift needs two [P, D] arrays, P >= 2, of the same "
      f"shape; got {a.shape} and {b.shape}"
    )
  diff = np.abs(a @ a.T - b @ b.T)
  p = a.shape[0]
  return float((diff.sum() - np.trace(diff)) / (p * (p - 1)))


def rank_drift(a: np.ndarray, b: np.ndarray, *, k: int = RANK_K) -> float:
  """``1 - mean_i |top-k(a, i) & top-k(b, i)| / k``: the share of each probe's k
  nearest probe neighbours (itself excluded) that changed. In [0, 1]."""
  a, b = _unit(a), _unit(b)
  p = a.shape[0]
  k = min(int(k), p - 1)
  if k < 1:
    raise ValueError(f"rank_drift needs at least 2 probes, got {p}")

  def topk(x):
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]

  ta, tb = topk(a), topk(b)
  in_a = np.zeros((p, p), bool)
  np.put_along_axis(in_a, ta, True, axis=1)
  overlap = np.take_along_axis(in_a, tb, axis=1).sum(axis=1)
  return float(1.0 - np.mean(overlap) / k)


def parse_drift_metrics(metrics: Optional[Dict[str, float]]) -> Dict[int, float]:
  """``{"train/drift@100": 0.02, ...}`` -> ``{100: 0.02}``; other keys are ignored."""
  out: Dict[int, float] = {}
  for name, value in (metrics or {}).items():
    if name.startswith(METRIC_PREFIX):
      try:
        out[int(name[len(METRIC_PREFIX) :])] = float(value)
      except ValueError as e:
        raise ValueError(
          f"bad drift metric name {name!r}: expected '{METRIC_PREFIX}<int delta>'"
        ) from e
  return out


class DriftMonitor:
  """Keeps a small ring of probe-set snapshots and reports drift at fixed lags.

  Args (keyword-only):
    interval: steps between two calls of :meth:`update`.
    deltas: the lags to report, each a positive multiple of ``interval`` (checked
      with the config by ``xbm_jax.train.validation``).
    num_probe, dim: optional; when both are given the ring is allocated up front, so
      :meth:`state_dict` has the same shapes from step 0 (handy for a checkpoint
      template). Otherwise it is allocated at the first update.

  The snapshot of step ``s`` lives in slot ``(s // interval) % R``; a drift value is
  reported only when the slot for ``s - delta`` holds exactly that step, so a skipped
  or misaligned call yields a missing metric, never a wrong one.
  """

  def __init__(
    self,
    *,
    interval: int,
    deltas: Sequence[int],
    num_probe: Optional[int] = None,
    dim: Optional[int] = None,
  ):
    deltas = sorted({int(d) for d in deltas})  # positive multiples of interval
    self.interval = int(interval)
    self.deltas = tuple(deltas)
    self.ring_size = max(deltas) // self.interval + 1
    self._steps = np.full((self.ring_size,), -1, np.int64)
    self._embs: Optional[np.ndarray] = None
    if num_probe is not None and dim is not None:
      self._embs = np.zeros((self.ring_size, int(num_probe), int(dim)), np.float32)

  def _slot(self, step: int) -> int:
    return (step // self.interval) % self.ring_size

  def holds(self, step: int) -> bool:
    """Whether the ring holds the snapshot of `step`."""
    return bool(self._steps[self._slot(int(step))] == int(step))

  def update(self, step: int, probe_emb: np.ndarray) -> Dict[str, float]:
    """Stores ``probe_emb`` as the snapshot of ``step`` and returns the drifts.

    Args:
      step: the training step the embeddings were computed at (>= 0).
      probe_emb: ``[P, D]`` float, the fixed probe set embedded in eval mode.

    Returns:
      ``{"train/drift@<delta>": float, "train/rel_drift@<delta>": float,
      "train/rank_drift@<delta>": float}`` for each delta whose earlier snapshot
      exists (see :func:`mean_cosine_drift`, :func:`relational_drift`,
      :func:`rank_drift`).
    """
    step = int(step)
    emb = np.asarray(probe_emb, np.float32)
    if emb.ndim != 2:
      raise ValueError(f"probe_emb must be [P, D], got shape {emb.shape}")
    if self._embs is None:
      self._embs = np.zeros((self.ring_size,) + emb.shape, np.float32)
    elif self._embs.shape[1:] != emb.shape:
      raise ValueError(
        f"probe_emb shape {emb.shape} differs from the monitor's "
        f"{self._embs.shape[1:]} (the probe set must stay fixed)"
      )
    # Snapshots from the "future" of this step are stale (e.g. a restart from an
    # older checkpoint with a newer monitor state): forget them.
    self._steps[self._steps >= step] = -1
    out = {}
    for d in self.deltas:
      slot = self._slot(step - d)
      if step - d >= 0 and self._steps[slot] == step - d:
        old = self._embs[slot]
        out[f"{METRIC_PREFIX}{d}"] = mean_cosine_drift(emb, old)
        out[f"{REL_PREFIX}{d}"] = relational_drift(emb, old)
        out[f"{RANK_PREFIX}{d}"] = rank_drift(emb, old)
    slot = self._slot(step)
    self._embs[slot] = emb
    self._steps[slot] = step
    return out

  def state_dict(self) -> Dict[str, np.ndarray]:
    """Plain numpy arrays: ``steps`` int64 [R] (-1 = empty slot), ``embs`` float32
    [R, P, D] (``[R, 0, 0]`` before the first update unless preallocated),
    ``interval`` and ``deltas`` int64 (checked on load)."""
    embs = self._embs if self._embs is not None else np.zeros((self.ring_size, 0, 0), np.float32)
    return {
      "steps": self._steps.copy(),
      "embs": embs.copy(),
      "interval": np.asarray(self.interval, np.int64),
      "deltas": np.asarray(self.deltas, np.int64),
    }

  def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
    """Restores :meth:`state_dict` output. A ring saved with another interval or
    set of deltas is re-slotted into this one (snapshots that fit are kept)."""
    for key in ("steps", "embs"):
      if key not in state:
        raise KeyError(f"DriftMonitor state lacks {key!r}")
    steps = np.asarray(state["steps"], np.int64).reshape(-1)
    embs = np.asarray(state["embs"], np.float32)
    if embs.ndim != 3 or embs.shape[0] != steps.shape[0]:
      raise ValueError(f"DriftMonitor state: embs {embs.shape} does not match steps {steps.shape}")
    self._steps = np.full((self.ring_size,), -1, np.int64)
    if embs.shape[1] == 0 or not np.any(steps >= 0):
      # Nothing stored: keep (or drop) the preallocated ring as it is.
      if embs.shape[1] != 0:
        self._embs = np.zeros((self.ring_size,) + embs.shape[1:], np.float32)
      return
    self._embs = np.zeros((self.ring_size,) + embs.shape[1:], np.float32)
    newest = int(steps.max())
    for i in np.argsort(steps):  # oldest first, so newer steps win a shared slot
      s = int(steps[i])
      if s < 0 or s < newest - max(self.deltas):
        continue
      self._embs[self._slot(s)] = embs[i]
      self._steps[self._slot(s)] = s
