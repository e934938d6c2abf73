"""DriftMonitor and mean_cosine_drift against a NumPy loop over rows."""
import math

import numpy as np
import pytest

from xbm_jax.insight.drift import DriftMonitor, mean_cosine_drift


def _oracle(a, b):
    total = 0.0
    for x, y in zip(a.astype(np.float64), b.astype(np.float64)):
        cos = float(x @ y) / (math.sqrt(float(x @ x)) * math.sqrt(float(y @ y)))
        total += 1.0 - cos
    return total / len(a)


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
    with pytest.raises(ValueError, match="multiple of interval"):
        DriftMonitor(interval=10, deltas=[15])


def test_monitor_reports_each_available_delta():
    rng = np.random.default_rng(1)
    snaps = {s: rng.normal(size=(8, 4)) for s in range(0, 501, 50)}
    mon = DriftMonitor(interval=50, deltas=[50, 200])
    assert mon.ring_size == 5
    for s, e in snaps.items():
        out = mon.update(s, e)
        want = {}
        if s >= 50:
            want["train/drift@50"] = _oracle(e, snaps[s - 50])
        if s >= 200:
            want["train/drift@200"] = _oracle(e, snaps[s - 200])
        assert set(out) == set(want), s
        for k in want:
            assert out[k] == pytest.approx(want[k], rel=1e-5)
    # A skipped measurement gives a missing value, never a wrong one.
    assert mon.update(600, snaps[0]) == {"train/drift@200": pytest.approx(
        _oracle(snaps[0], snaps[400]), rel=1e-5)}


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
    assert mon.update(40, x) == {"train/drift@10": pytest.approx(
        _oracle(x, embs[3]), rel=1e-5)}
