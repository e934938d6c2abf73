"""HostState and the loop's hooks, on the host only (no model, no compile)."""

import numpy as np
import pytest

from xbm_jax.control.controller import MemoryController
from xbm_jax.insight.drift import DriftMonitor
from xbm_jax.train import guards, hooks, optim


class Batches:
  def __init__(self, step):
    self.step = step

  def get_state(self):
    return {"step": self.step, "seed": 0}


def make(prefill_log):
  ctrl = MemoryController(start_step=2, weight=0.5)
  prefill = lambda state, step: prefill_log.append(step) or "filled"
  mem = hooks.MemoryControl(ctrl, prefill_fn=prefill)
  plateau = hooks.PlateauHook(optim.Plateau(patience=1), metric="eval/x/recall@1")
  return hooks.HostState(plateau=plateau, memory=mem), mem


def test_memory_control_feeds_the_controller_and_prefills_once_at_the_first_active_step():
  log = []
  _, mem = make(log)
  fed, state = [], "empty"
  for step in range(5):
    start, weight = mem.controls(step, {})
    state = mem.prefill(step, state, start)
    fed.append((start, weight))
  assert fed == [(2, 0.0), (2, 0.0), (2, 0.5), (2, 0.5), (2, 0.5)]
  assert log == [2] and state == "filled"  # update 3 (1-based), once


def test_drift_probe_measures_every_interval_once_per_step():
  """A reading after updates 2 and 4 (interval 2), the lag-2 drift of the second
  against the first; a step the monitor already holds is not measured again (a
  resume from the checkpoint written after it)."""
  rng = np.random.default_rng(0)
  probes = {s: rng.normal(size=(6, 3)) for s in (0, 2, 4)}
  calls = []

  def embed(state):
    calls.append(state)
    return probes[state]

  probe = hooks.DriftProbe(
    DriftMonitor(interval=2, deltas=(2,)),
    interval=2,
    embed_probe=embed,
    watch=guards.CollapseWatch(),
  )
  readings = {s: probe.measure(s, s) for s in range(5)}
  assert calls == [0, 2, 4]
  assert {s for s, r in readings.items() if r} == {2, 4}
  from tests.helpers.drift import mean_cosine_drift_oracle as _oracle

  want = _oracle(probes[4].astype(np.float32), probes[2].astype(np.float32))
  assert readings[4]["train/drift@2"] == pytest.approx(want, rel=1e-6)
  saved = probe.state_dict()
  again = hooks.DriftProbe(
    DriftMonitor(interval=2, deltas=(2,)),
    interval=2,
    embed_probe=embed,
    watch=guards.CollapseWatch(),
  )
  again.load_state_dict(saved)
  assert again.measure(4, 4) == {} and calls == [0, 2, 4]


def test_plateau_hook_reads_its_metric_only():
  p = hooks.PlateauHook(optim.Plateau(patience=1, factor=0.5), metric="eval/x/recall@1")
  p.after_eval({"eval/x/recall@1": 0.3})
  p.after_eval({"eval/y/recall@1": 0.1})  # another evaluator: no reading
  assert p.scale == 1.0
  p.after_eval({"eval/x/recall@1": 0.2})  # no improvement, patience 1: halved
  assert p.scale == 0.5
  off = hooks.PlateauHook(optim.Plateau(patience=1), metric="")
  off.after_eval({"eval/x/recall@1": 0.3})
  off.after_eval({"eval/x/recall@1": 0.2})
  assert off.scale == 1.0


def test_host_state_round_trip():
  log = []
  a, mem_a = make(log)
  a.batches = Batches(7)
  for step in range(4):
    mem_a.prefill(step, None, mem_a.controls(step, {})[0])
  a.plateau.after_eval({"eval/x/recall@1": 0.3})
  a.plateau.after_eval({"eval/x/recall@1": 0.2})  # patience 1: the scale halves
  saved = a.state_dict()
  assert saved["pipeline"] == {"step": 7, "seed": 0} and saved["prefilled"] is True
  assert set(saved) == {"pipeline", "prefilled", "plateau", "controller"}
  b, mem_b = make(log)
  b.load_state_dict(saved)
  assert b.pipeline == {"step": 7, "seed": 0}
  assert b.plateau.state_dict() == a.plateau.state_dict() and b.plateau.scale == 0.5
  assert mem_b.prefilled
  mem_b.prefill(4, None, mem_b.controls(4, {})[0])
  assert log == [2]  # a resumed run does not pre-fill again


def test_refresh_every_refills_the_memory_every_k_updates_after_the_first_fill():
  """The fresh-memory oracle: fills at the first active update (2) and then at
  2 + 3i; a hook rebuilt from a checkpoint keeps that grid."""
  log = []

  def run(mem, steps):
    for step in steps:
      mem.prefill(step, None, mem.controls(step, {})[0])

  def fill(state, step):
    log.append(step)
    return state

  mem = hooks.MemoryControl(
    MemoryController(start_step=2, weight=1.0), prefill_fn=fill, refresh_every=3
  )
  run(mem, range(10))
  assert log == [2, 5, 8]
  resumed = hooks.MemoryControl(
    MemoryController(start_step=2, weight=1.0), prefill_fn=fill, refresh_every=3
  )
  resumed.prefilled = True  # as HostState.load_state_dict restores it
  run(resumed, range(9, 12))
  assert log == [2, 5, 8, 11]
