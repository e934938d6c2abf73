"""DriftMonitor and mean_cosine_drift against a NumPy loop over rows."""

import numpy as np
import pytest

from xbm_jax.insight import drift
from xbm_jax.insight.drift import DriftMonitor, mean_cosine_drift
from tests.helpers.drift import mean_cosine_drift_oracle as _oracle


def test_unchanged_is_exactly_zero_and_grows_with_noise():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(64, 16)).astype(np.float32)
  assert mean_cosine_drift(a, a) == 0.0
  assert mean_cosine_drift(a, 3.0 * a) == pytest.approx(0.0, abs=1e-12)  # scale-free
  prev = 0.0
  noise = rng.normal(size=a.shape).astype(np.float32)
  for scale in (0.01, 0.05, 0.1, 0.3, 1.0, 3.0):
    b = a + scale * noise
    d = mean_cosine_drift(a, b)
    assert d == pytest.approx(_oracle(a, b), rel=1e-6, abs=1e-12)
    assert d > prev
    prev = d
  assert mean_cosine_drift(a, -a) == pytest.approx(2.0)


def test_shape_errors():
  with pytest.raises(ValueError, match="same shape"):
    mean_cosine_drift(np.ones((3, 4)), np.ones((3, 5)))


def _cos_only(out):
  """The mean (1 - cos) readings of a DriftMonitor output."""
  return {k: v for k, v in out.items() if k.startswith("train/drift@")}


def test_monitor_reports_each_available_delta():
  rng = np.random.default_rng(1)
  snaps = {s: rng.normal(size=(8, 4)) for s in range(0, 501, 50)}
  mon = DriftMonitor(interval=50, deltas=[50, 200])
  assert mon.ring_size == 5
  for s, e in snaps.items():
    out = _cos_only(mon.update(s, e))
    want = {}
    if s >= 50:
      want["train/drift@50"] = _oracle(e, snaps[s - 50])
    if s >= 200:
      want["train/drift@200"] = _oracle(e, snaps[s - 200])
    assert set(out) == set(want), s
    for k in want:
      assert out[k] == pytest.approx(want[k], rel=1e-5)
  # A skipped measurement gives a missing value, never a wrong one.
  assert _cos_only(mon.update(600, snaps[0])) == {
    "train/drift@200": pytest.approx(_oracle(snaps[0], snaps[400]), rel=1e-5)
  }


def test_state_round_trip_and_preallocation():
  rng = np.random.default_rng(2)
  mon = DriftMonitor(interval=10, deltas=[10, 30], num_probe=5, dim=3)
  assert mon.state_dict()["embs"].shape == (4, 5, 3)
  embs = [rng.normal(size=(5, 3)) for _ in range(6)]
  for i in range(4):
    mon.update(10 * i, embs[i])
  state = {k: np.array(v) for k, v in mon.state_dict().items()}
  assert all(isinstance(v, np.ndarray) for v in state.values())
  other = DriftMonitor(interval=10, deltas=[10, 30])
  other.load_state_dict(state)
  for i in (4, 5):
    assert other.update(10 * i, embs[i]) == mon.update(10 * i, embs[i])
  # Ring of 4 now holds 20, 30, 40, 50. A restart at 40 drops 40 and 50; step 10's
  # slot was taken by 50, so only drift@10 (against 30) is left.
  x = embs[4] + 0.1
  assert _cos_only(mon.update(40, x)) == {
    "train/drift@10": pytest.approx(_oracle(x, embs[3]), rel=1e-5)
  }


def _rel_oracle(a, b):
  """Python loop over ordered pairs i != j of |cos_a(i, j) - cos_b(i, j)|."""

  def cos(x, i, j):
    return float(np.dot(x[i], x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j])))

  p = len(a)
  vals = [abs(cos(a, i, j) - cos(b, i, j)) for i in range(p) for j in range(p) if i != j]
  return sum(vals) / len(vals)


def _rank_oracle(a, b, k):
  """Per probe: its k nearest other probes by cosine under a and under b (a loop)."""

  def nn(x, i):
    sims = [
      (float(np.dot(x[i], x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))), j)
      for j in range(len(x))
      if j != i
    ]
    return {j for _, j in sorted(sims, key=lambda t: (-t[0], t[1]))[:k]}

  return 1.0 - np.mean([len(nn(a, i) & nn(b, i)) / k for i in range(len(a))])


def test_relational_and_rank_drift_match_pair_loops_and_ignore_rotations():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(12, 5))
  b = a + 0.4 * rng.normal(size=a.shape)
  np.testing.assert_allclose(drift.relational_drift(a, b), _rel_oracle(a, b), rtol=1e-10)
  assert drift.rank_drift(a, b, k=3) == pytest.approx(_rank_oracle(a, b, 3))
  assert drift.rank_drift(a, b, k=3) > 0
  # A rotation of the whole space moves every embedding but no similarity.
  q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  assert drift.mean_cosine_drift(a, a @ q) > 0.3
  assert drift.relational_drift(a, a @ q) < 1e-12
  assert drift.rank_drift(a, a @ q, k=3) == 0.0


def test_monitor_reports_all_three_measures():
  rng = np.random.default_rng(0)
  mon = drift.DriftMonitor(interval=10, deltas=(10,))
  a = rng.normal(size=(8, 4))
  assert mon.update(0, a) == {}
  q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  out = mon.update(10, a @ q)
  assert set(out) == {"train/drift@10", "train/rel_drift@10", "train/rank_drift@10"}
  assert out["train/drift@10"] > 0.1 and out["train/rel_drift@10"] < 1e-6
  assert drift.parse_drift_metrics(out) == {10: out["train/drift@10"]}
