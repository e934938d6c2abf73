"""The host-side parts of a run that act between steps, each with explicit inputs.

* `DriftProbe.measure(done, state) -> reading`: after the update `done`, the drift
  of the probe embeddings (every `interval` updates; `{}` otherwise).
* `MemoryControl.controls(step, reading) -> (start, weight)`: the memory's traced
  controls for the update `step`, from the reading taken just before it; and
  `prefill(step, state, start) -> state` before the memory's first active update.
* `PlateauHook.after_eval(metrics)`: the learning-rate scale from an evaluation.

The loop calls each by name and passes what it needs; nothing is shared between
them. `HostState` gathers their checkpointed state with the pipeline position.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax

from xbm_jax import memory as memory_lib, sharded_memory
from xbm_jax.train import optim


class DriftProbe:
  """Embeds the fixed probe set after every `interval`-th update and returns the
  `DriftMonitor` reading; the collapse watch sees the embeddings too."""

  key = "drift"

  def __init__(self, monitor, *, interval: int, embed_probe: Callable, watch):
    self.monitor, self.interval = monitor, int(interval)
    self.embed_probe, self.watch = embed_probe, watch

  def measure(self, done: int, state) -> dict:
    """The reading after `done` updates, `{}` when none is due or the monitor holds
    this step already (a resumed run took it before its checkpoint)."""
    if done % self.interval or self.monitor.holds(done):
      return {}
    probe = self.embed_probe(state)
    self.watch.probe(done, probe)
    return self.monitor.update(done, probe)

  def state_dict(self):
    return self.monitor.state_dict()

  def load_state_dict(self, d) -> None:
    self.monitor.load_state_dict(d)


class MemoryControl:
  """The `MemoryController`'s start step and weight for each update, and the
  pre-fill of the memory from the model before its first active update (the
  paper's initialisation) when `prefill_fn` is given. With `refresh_every` = k > 0 it
  fills it again every k updates after that (the fresh-memory oracle: no entry older
  than k updates)."""

  key = "controller"

  def __init__(self, controller, *, prefill_fn: Optional[Callable] = None, refresh_every=0):
    """`prefill_fn(state, step) -> state` with a full memory, or None."""
    self.controller, self.prefill_fn = controller, prefill_fn
    self.refresh_every = int(refresh_every)
    self.prefilled = False

  def controls(self, step: int, reading: dict) -> tuple[int, float]:
    """`(start, weight)` to feed the update `step`; `reading` is the drift reading
    taken after `step` updates (`{}` if none)."""
    return self.controller.update(step, reading or None)

  def prefill(self, step: int, state, start: int):
    """`state` with the memory pre-filled before its first active update, and again
    every `refresh_every` updates after it."""
    if self.prefill_fn is None or not memory_lib.active(step, start):
      return state
    # A resumed run refreshes on the same grid of updates (start + i * k) as one long run.
    since = step - int(start)
    due = self.refresh_every > 0 and since > 0 and since % self.refresh_every == 0
    if self.prefilled and not due:
      return state
    self.prefilled = True
    return self.prefill_fn(state, step)

  def log(self) -> dict:
    return self.controller.log()

  def state_dict(self):
    return self.controller.state_dict()

  def load_state_dict(self, d) -> None:
    self.controller.load_state_dict(d)


class PlateauHook:
  """Reduce-on-plateau over `metric` (`""`: the scale stays 1)."""

  key = "plateau"

  def __init__(self, plateau: optim.Plateau, *, metric: str):
    self.plateau, self.metric = plateau, metric

  @property
  def scale(self) -> float:
    return self.plateau.scale

  def after_eval(self, metrics: dict) -> None:
    if self.metric and self.metric in metrics:
      self.plateau.update(metrics[self.metric])

  def state_dict(self):
    return self.plateau.state_dict()

  def load_state_dict(self, d) -> None:
    self.plateau.load_state_dict(d)


def make_prefill(config, evals, train_src, shardings, mesh, *, sharded: bool):
  """`prefill(state, step) -> state`: the memory filled with eval-mode embeddings of
  training images (seeded by the run's seed and the step, so a resume redoes it
  identically), laid out like the state's memory; with `xbm.reprojection` their
  pooled features, which the memory then stores."""
  features = bool(config.xbm.reprojection)

  def prefill(state, step):
    seed = int(config.seed) * 7919 + step
    full = evals.prefill(state, train_src, size=int(config.xbm.size), seed=seed, features=features)
    if sharded:
      full = sharded_memory.reshard(full, mesh.size)
    return state.replace(memory=jax.device_put(full, shardings.memory))

  return prefill


class HostState:
  """What a resume must restore besides the train state: the pipeline position,
  the plateau scheduler, the drift monitor and the memory controller (either may
  be absent) and whether the memory was pre-filled.

  The keys of `state_dict()` ("pipeline", "plateau", "prefilled", "drift",
  "controller") are those of the checkpoints written before this class, so they
  resume.
  """

  def __init__(
    self,
    *,
    plateau: PlateauHook,
    drift: Optional[DriftProbe] = None,
    memory: Optional[MemoryControl] = None,
  ):
    self.plateau, self.drift, self.memory = plateau, drift, memory
    self.batches = None  # the pipeline, once built; its position is read on save
    self.pipeline = None  # a restored position, for building the pipeline

  def _parts(self):
    return [p for p in (self.plateau, self.drift, self.memory) if p is not None]

  def state_dict(self) -> dict:
    out = {
      "pipeline": self.batches.get_state(),
      "prefilled": bool(self.memory is not None and self.memory.prefilled),
    }
    out.update({p.key: p.state_dict() for p in self._parts()})
    return out

  def load_state_dict(self, d: dict) -> None:
    """Restores all but the pipeline, whose position is kept in `self.pipeline`
    for the caller to build the pipeline from (grain iterators start at a step)."""
    self.pipeline = d.get("pipeline")
    for p in self._parts():
      if p.key in d:
        p.load_state_dict(d[p.key])
    if self.memory is not None:
      self.memory.prefilled = bool(d.get("prefilled"))
