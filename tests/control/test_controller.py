"""MemoryController on hand-computed drift sequences."""

import numpy as np
import pytest

from xbm_jax.control.controller import NEVER, MemoryController, span_drift


def test_span_drift_interpolates_and_extrapolates():
  d = {50: 0.1, 100: 0.3}
  assert span_drift(d, 25) == pytest.approx(0.05)  # (0, 0) -> (50, 0.1)
  assert span_drift(d, 75) == pytest.approx(0.2)  # between 50 and 100
  assert span_drift(d, 200) == pytest.approx(0.6)  # 0.3 / 100 per step
  assert span_drift({}, 10) is None
  assert span_drift({10: 1.5}, 100) == 2.0  # clipped


def test_fixed_start_with_ramp():
  c = MemoryController(start_step=100, weight=2.0, ramp_steps=50)
  # Update 100 (0-based) is the first to use the memory, at 1 / 50 of the weight.
  got = [c.update(s)[1] for s in (0, 99, 100, 101, 124, 149, 400)]
  assert got == pytest.approx([0.0, 0.0, 0.04, 0.08, 1.0, 2.0, 2.0])
  assert c.update(7) == (100, 0.0)
  assert "train/xbm_auto_start_step" not in c.log()


def test_fixed_start_is_the_default_and_ignores_drift():
  c = MemoryController()
  assert c.update(999, {"train/drift@100": 5.0}) == (1000, 0.0)
  assert c.update(1000, {"train/drift@100": 5.0}) == (1000, 1.0)


def test_auto_start_fires_at_the_right_step():
  # span = 800 / 8 = 100 steps; threshold 0.05.
  c = MemoryController(
    start_step="auto", memory_size=800, global_batch=8, threshold=0.05, ramp_steps=10
  )
  seq = {
    50: {"train/drift@50": 0.2},  # 0.4 extrapolated
    100: {"train/drift@50": 0.1, "train/drift@100": 0.3},  # 0.3
    150: {"train/drift@50": 0.03, "train/drift@100": 0.08},  # 0.08
    200: {"train/drift@50": 0.02, "train/drift@100": 0.04},  # 0.04 < 0.05
    250: {"train/drift@50": 0.5, "train/drift@100": 0.9},
  }  # too late to matter
  out = {}
  for s in range(0, 260, 5):
    out[s] = c.update(s, seq.get(s))
  assert out[195] == (NEVER, 0.0)
  assert out[200] == (200, pytest.approx(0.1))  # fires and acts at once
  assert out[205] == (200, pytest.approx(0.6))
  assert out[210] == (200, pytest.approx(1.0))
  assert out[250] == (200, pytest.approx(1.0))  # no back-off configured
  assert c.log()["train/xbm_auto_start_step"] == 200.0
  assert c.log()["train/xbm_span_drift"] == pytest.approx(0.04)


def test_auto_respects_min_and_max_step():
  c = MemoryController(
    start_step="auto",
    memory_size=100,
    global_batch=1,
    threshold=0.1,
    min_auto_step=300,
    auto_max_step=500,
  )
  assert c.update(200, {"train/drift@100": 0.0})[0] == NEVER
  assert c.update(400, {"train/drift@100": 0.5})[0] == NEVER
  assert c.update(500, None)[0] == 500


def test_backoff_cuts_and_recovers():
  c = MemoryController(
    start_step=0,
    weight=1.0,
    memory_size=800,
    global_batch=8,
    threshold=0.1,
    backoff=True,
    backoff_factor=0.5,
    min_weight=0.2,
    recover_steps=400,
  )
  drifts = {100: 0.05, 200: 0.3, 300: 0.3, 400: 0.3, 500: 0.05, 600: 0.05, 700: 0.05, 800: 0.05}
  want = {
    100: 1.0,
    200: 0.5,
    300: 0.25,
    400: 0.2,
    450: 0.2,
    500: 0.45,
    600: 0.7,
    700: 0.95,
    800: 1.0,
  }
  for s in range(1, 801):
    m = {"train/drift@100": drifts[s]} if s in drifts else None
    start, w = c.update(s, m)
    if s in want:
      assert (start, w) == (0, pytest.approx(want[s])), s
  assert c.log()["train/xbm_weight"] == pytest.approx(1.0)


def test_backoff_ignores_windows_from_before_the_start():
  c = MemoryController(start_step=100, memory_size=100, global_batch=1, threshold=0.1, backoff=True)
  assert c.update(150, {"train/drift@100": 0.9}) == (100, 1.0)  # window 50..150
  assert c.update(200, {"train/drift@100": 0.9}) == (100, 0.5)  # window 100..200


def test_state_round_trip():
  kw = dict(
    start_step="auto",
    memory_size=400,
    global_batch=4,
    threshold=0.1,
    backoff=True,
    ramp_steps=20,
    recover_steps=100,
  )
  rng = np.random.default_rng(0)
  seq = {s: {"train/drift@10": float(rng.uniform(0, 0.03))} for s in range(10, 400, 10)}
  a = MemoryController(**kw)
  for s in range(150):
    a.update(s, seq.get(s))
  state = a.state_dict()
  assert all(isinstance(v, np.ndarray) for v in state.values())
  b = MemoryController(**kw)
  b.load_state_dict(state)
  assert b.log() == a.log()
  for s in range(150, 400):
    assert b.update(s, seq.get(s)) == a.update(s, seq.get(s))


def test_from_config():
  c = MemoryController.from_config({"start_step": 5, "weight": 0.1}, global_batch=64)
  assert c.update(4) == (5, 0.0)
  assert c.update(5) == (5, pytest.approx(0.1))


def test_guard_switches_off_when_rank_drift_outpaces_the_memory_free_reading():
  c = MemoryController(start_step=100, weight=1.0, guard=True, guard_ratio=2.0)

  def rd(**lags):  # rank drift readings by lag, beside the cosine drift
    out = {f"train/rank_drift@{d[1:]}": v for d, v in lags.items()}
    out.update({f"train/drift@{d[1:]}": 0.5 for d in lags})
    return out

  assert c.update(50, rd(l50=0.20)) == (100, 0.0)
  # The last memory-free reading, at the smallest lag, is the reference: 0.10.
  assert c.update(100, rd(l50=0.10, l100=0.30)) == (100, 1.0)
  assert (c.base_lag, c.base_value) == (50, pytest.approx(0.10))
  # Lag 50 at step 149 covers updates 99..149, one of them before the switch-on: ignored.
  assert c.update(149, rd(l50=0.9)) == (100, 1.0)
  # 0.19 < 2 x 0.10: on; a larger lag never decides (0.9 at lag 100 is ignored).
  assert c.update(150, rd(l50=0.19, l100=0.9)) == (100, 1.0)
  # 0.21 > 2 x 0.10: off for good, whatever comes later; off feeds NEVER as the
  # start, so the step neither enqueues nor weighs the memory term (memory.active).
  assert c.update(200, rd(l50=0.21)) == (NEVER, 0.0)
  assert c.log()["train/xbm_guard_off_step"] == 200.0
  assert c.update(250, rd(l50=0.0)) == (NEVER, 0.0)
  other = MemoryController(start_step=100, weight=1.0, guard=True)
  other.load_state_dict(c.state_dict())
  assert other.update(300) == (NEVER, 0.0) and other.base_value == c.base_value


def test_guard_waits_for_consecutive_readings_over_the_ratio():
  """guard_readings=2: one reading over 2 x the base is not enough, a calm one in
  between resets the count, two in a row switch the memory off."""
  c = MemoryController(start_step=100, weight=1.0, guard=True, guard_readings=2)
  rd = lambda v: {"train/rank_drift@50": v}
  c.update(100, rd(0.10))  # the memory-free reference: 0.10
  over, calm = rd(0.25), rd(0.15)
  fed = [c.update(s, r) for s, r in ((150, over), (200, calm), (250, over), (300, over))]
  assert fed == [(100, 1.0), (100, 1.0), (100, 1.0), (NEVER, 0.0)]
  assert c.log()["train/xbm_guard_off_step"] == 300.0
  # The count is state: a resume between two readings over the ratio keeps it.
  d = MemoryController(start_step=100, weight=1.0, guard=True, guard_readings=2)
  d.update(100, rd(0.10))
  d.update(150, over)
  e = MemoryController(start_step=100, weight=1.0, guard=True, guard_readings=2)
  e.load_state_dict(d.state_dict())
  assert e.update(200, over) == (NEVER, 0.0)


def test_guard_floor_and_calibration():
  # No memory-free reading (memory on from step 0): the guard never acts.
  c = MemoryController(start_step=0, weight=1.0, guard=True)
  assert c.update(50, {"train/rank_drift@50": 0.9}) == (0, 1.0)
  # A model that did not move before the start: the floor (0.01) is the reference.
  c = MemoryController(start_step=50, weight=1.0, guard=True, guard_ratio=2.0)
  c.update(50 - 1, {"train/rank_drift@10": 0.0})
  assert c.update(100, {"train/rank_drift@10": 0.019}) == (50, 1.0)
  assert c.update(110, {"train/rank_drift@10": 0.021}) == (NEVER, 0.0)


def test_backoff_threshold_is_a_config_key():
  from xbm_jax.train import config as config_lib, validation

  c = config_lib.base()
  c.xbm.backoff, c.xbm.backoff_threshold = True, 0.2
  validation.check_keys(c)  # a known key
  ctrl = MemoryController.from_config(c.xbm, global_batch=64)
  assert ctrl.backoff_threshold == 0.2 and ctrl.threshold == c.xbm.threshold
  c.xbm.backoff_threshold = None
  assert MemoryController.from_config(c.xbm, global_batch=64).backoff_threshold == c.xbm.threshold
