"""HostState and the loop's hooks, on the host only (no model, no compile)."""

from xbm_jax.insight.controller import NEVER, MemoryController
from xbm_jax.train import hooks, optim


class Batches:
  def __init__(self, step):
    self.step = step

  def get_state(self):
    return {"step": self.step, "seed": 0}


def make(prefill_log):
  ctrl = MemoryController(start_step=2, weight=0.5)
  prefill = lambda state, step: prefill_log.append(step) or "filled"
  mem = hooks.MemoryHook(ctrl, prefill_fn=prefill)
  return hooks.HostState(plateau=optim.Plateau(patience=1), hooks=[mem]), mem


def test_memory_hook_feeds_the_controller_and_prefills_once_at_the_first_active_step():
  log = []
  host, mem = make(log)
  fed = []
  state = "empty"
  for step in range(5):
    ctrl = {"start_step": NEVER, "xbm_weight": 0.0}
    state = mem.before_step(step, state, ctrl, {})
    fed.append((ctrl["start_step"], ctrl["xbm_weight"]))
  assert fed == [(2, 0.0), (2, 0.0), (2, 0.5), (2, 0.5), (2, 0.5)]
  assert log == [2] and state == "filled"  # update 3 (1-based), once


def test_host_state_round_trip():
  log = []
  a, mem_a = make(log)
  a.batches = Batches(7)
  for step in range(4):
    mem_a.before_step(step, None, {}, {})
  a.plateau.update(0.3)
  a.plateau.update(0.2)  # patience 1: the scale halves
  saved = a.state_dict()
  assert saved["pipeline"] == {"step": 7, "seed": 0} and saved["prefilled"] is True
  b, mem_b = make(log)
  b.load_state_dict(saved)
  assert b.pipeline == {"step": 7, "seed": 0}
  assert b.plateau.state_dict() == a.plateau.state_dict() and b.plateau.scale == 0.5
  assert mem_b.prefilled
  mem_b.before_step(4, None, {}, {})
  assert log == [2]  # a resumed run does not pre-fill again


def test_refresh_every_refills_the_memory_every_k_updates_after_the_first_fill():
  """The fresh-memory oracle: fills at the first active update (2) and then at
  2 + 3i; a hook rebuilt from a checkpoint keeps that grid."""
  log = []
  ctrl = MemoryController(start_step=2, weight=1.0)
  mem = hooks.MemoryHook(ctrl, prefill_fn=lambda s, step: log.append(step), refresh_every=3)
  for step in range(10):
    mem.before_step(step, None, {}, {})
  assert log == [2, 5, 8]
  resumed = hooks.MemoryHook(
    MemoryController(start_step=2, weight=1.0),
    prefill_fn=lambda s, step: log.append(step),
    refresh_every=3,
  )
  resumed.prefilled = True  # as HostState.load_state_dict restores it
  for step in range(9, 12):
    resumed.before_step(step, None, {}, {})
  assert log == [2, 5, 8, 11]
