"""The host-side state of a run and the loop's optional hooks.

A hook runs on the host before each step (`before_step`), may add scalars to the
next log line (`log`) and has a checkpointed `state_dict`. The drift monitor and
the memory controller are hooks; a run without them (drift off, no memory) simply
has fewer hooks, and the loop does not know what they do.
"""

from __future__ import annotations

import jax

from xbm_jax import memory as memory_lib, sharded_memory
from xbm_jax.insight import controller as controller_lib
from xbm_jax.train import optim

NEVER = controller_lib.NEVER


class DriftHook:
  """Measures the drift of the probe embeddings every `interval` steps; the reading
  goes to the collapse watch and to later hooks of the same step (`notes["drift"]`);
  the loop logs it at its own step."""

  key = "drift"

  def __init__(self, monitor, *, interval: int, evals, watch):
    self.monitor, self.interval, self.evals, self.watch = monitor, interval, evals, watch

  def before_step(self, step: int, state, ctrl: dict, notes: dict):
    if step % self.interval == 0:
      probe = self.evals.embed_probe(state)
      self.watch.probe(step, probe)
      reading = self.monitor.update(step, probe)
      notes["drift"] = reading
    return state

  def log(self) -> dict:
    return {}

  def state_dict(self):
    return self.monitor.state_dict()

  def load_state_dict(self, d) -> None:
    self.monitor.load_state_dict(d)


class MemoryHook:
  """Feeds the memory's start step and weight from the `MemoryController`, and
  pre-fills the memory from the model before its first active update (the paper's
  initialisation) when `prefill` is on. With `refresh_every` = k > 0 it fills it again
  every k updates after that (the fresh-memory oracle: no entry older than k updates)."""

  key = "controller"

  def __init__(self, controller, *, prefill_fn=None, refresh_every: int = 0):
    """`prefill_fn(state, step) -> state` with a full memory, or None."""
    self.controller, self.prefill_fn = controller, prefill_fn
    self.refresh_every = int(refresh_every)
    self.prefilled = False

  def before_step(self, step: int, state, ctrl: dict, notes: dict):
    start, weight = self.controller.update(step, notes.get("drift") or None)
    ctrl["start_step"], ctrl["xbm_weight"] = start, weight
    if self.prefill_fn is None or not memory_lib.active(step, start):
      return state
    # A resumed run refreshes on the same grid of updates (start + i * k) as one long run.
    since = step - int(start)
    due = self.refresh_every > 0 and since > 0 and since % self.refresh_every == 0
    if not self.prefilled or due:
      state = self.prefill_fn(state, step)
      self.prefilled = True
    return state

  def log(self) -> dict:
    return self.controller.log()

  def state_dict(self):
    return self.controller.state_dict()

  def load_state_dict(self, d) -> None:
    self.controller.load_state_dict(d)


def make_prefill(config, evals, train_src, shardings, mesh, *, sharded: bool):
  """`prefill(state, step) -> state`: the memory filled with eval-mode embeddings of
  training images (seeded by the run's seed and the step, so a resume redoes it
  identically), laid out like the state's memory."""

  def prefill(state, step):
    full = evals.prefill(
      state, train_src, size=int(config.xbm.size), seed=int(config.seed) * 7919 + step
    )
    if sharded:
      full = sharded_memory.reshard(full, mesh.size)
    return state.replace(memory=jax.device_put(full, shardings.memory))

  return prefill


class HostState:
  """What a resume must restore besides the train state: the pipeline position,
  the plateau scheduler, each hook's state and whether the memory was pre-filled.

  The keys of `state_dict()` ("pipeline", "plateau", "prefilled", and each hook's
  `key`) are those of the checkpoints written before this class, so they resume.
  """

  def __init__(self, *, plateau: optim.Plateau, hooks=()):
    self.plateau, self.hooks = plateau, list(hooks)
    self.batches = None  # the pipeline, once built; its position is read on save
    self.pipeline = None  # a restored position, for building the pipeline

  def _memory_hook(self):
    return next((h for h in self.hooks if isinstance(h, MemoryHook)), None)

  def state_dict(self) -> dict:
    mem = self._memory_hook()
    out = {
      "pipeline": self.batches.get_state(),
      "plateau": self.plateau.state_dict(),
      "prefilled": bool(mem is not None and mem.prefilled),
    }
    out.update({h.key: h.state_dict() for h in self.hooks})
    return out

  def load_state_dict(self, d: dict) -> None:
    """Restores all but the pipeline, whose position is kept in `self.pipeline`
    for the caller to build the pipeline from (grain iterators start at a step)."""
    self.pipeline = d.get("pipeline")
    if "plateau" in d:
      self.plateau.load_state_dict(d["plateau"])
    for h in self.hooks:
      if h.key in d:
        h.load_state_dict(d[h.key])
    mem = self._memory_hook()
    if mem is not None:
      mem.prefilled = bool(d.get("prefilled"))
