"""The host-side parts of a run that act between steps, each with explicit inputs.

* `DriftProbe.measure(done, state) -> reading`: after the update `done`, the drift
  of the probe embeddings (every `interval` updates; `{}` otherwise).
* `MemoryControl.controls(step, reading) -> (start, weight)`: the memory's traced
  controls for the update `step`, from the reading taken just before it; and
  `prefill(step, state, start) -> state` before the memory's first active update.
* `PlateauHook.after_eval(metrics)`: the learning-rate scale from an evaluation.
* `PairedGuard.after_eval(done, start, hits) -> verdict scalars`: the paired guard's
  reading of an evaluation's per-query hits (`xbm.guard="paired"`).

The loop calls each by name and passes what it needs; nothing is shared between
them. `HostState` gathers their checkpointed state with the pipeline position.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np

from xbm_jax import memory as memory_lib
from xbm_jax.control import paired_guard
from xbm_jax.memory import sharded as sharded_memory
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


class PairedGuard:
  """`xbm.guard="paired"`: the memory goes off for good when, at an evaluation of
  `evaluator` after its start, the exact one-sided McNemar test of the per-query
  hits@k (`paired_guard.verdict`) against those of the last evaluation before the
  start (the free reference, kept here and checkpointed) fires at `alpha / looks`.

  Args (keyword-only): evaluator, k: the evaluator read and the k of its hits@k;
    alpha: the run's false-alarm rate; looks: its readings after the start.
  """

  key = "paired_guard"

  def __init__(self, *, evaluator: str, k: int, alpha: float, looks: int):
    self.evaluator, self.k = evaluator, int(k)
    self.alpha, self.looks = float(alpha), max(int(looks), 1)
    self.reference: Optional[np.ndarray] = None  # [Q] bool hits, the last memory-free reading
    self.reference_step = -1
    self.off_step = -1  # the evaluation step at which the guard fired

  @property
  def live(self) -> bool:
    return self.off_step < 0

  def hits_wanted(self) -> dict:
    """`{evaluator: k}`: the per-query hits an evaluation round must leave for this guard
    (none once it has fired)."""
    return {self.evaluator: self.k} if self.live else {}

  def after_eval(self, done: int, start: int, hits: Optional[np.ndarray]) -> dict:
    """Reads the hits of an evaluation after `done` updates, the memory's first active
    update being `start`: before it, they become the reference; after it, the verdict
    (logged, `{}` when none: no hits, no reference, or the guard fired already)."""
    if hits is None or not self.live:
      return {}
    if not memory_lib.active(done - 1, start):  # updates 0..done-1 ran memory-free
      self.reference, self.reference_step = np.asarray(hits, bool), int(done)
      return {}
    if self.reference is None:
      return {}
    v = paired_guard.verdict(hits, self.reference, alpha=self.alpha, looks=self.looks)
    if v.switch_off:
      self.off_step = int(done)
    return {
      "train/xbm_guard_gains": float(v.gains),
      "train/xbm_guard_losses": float(v.losses),
      "train/xbm_guard_p": float(v.p_value),
      "train/xbm_guard_difference": float(v.difference),
      "train/xbm_guard_reference_step": float(self.reference_step),
    }

  def state_dict(self) -> dict:
    ref = np.zeros((0,), bool) if self.reference is None else self.reference
    return {
      "reference_bits": np.packbits(ref),  # 1 bit a query in the JSON side-car
      "reference_len": np.asarray(len(ref), np.int64),
      "reference_step": np.asarray(self.reference_step, np.int64),
      "off_step": np.asarray(self.off_step, np.int64),
    }

  def load_state_dict(self, d) -> None:
    n = int(d["reference_len"])
    bits = np.asarray(d["reference_bits"], np.uint8)
    self.reference = np.unpackbits(bits, count=n).astype(bool) if n else None
    self.reference_step, self.off_step = int(d["reference_step"]), int(d["off_step"])


def make_paired_guard(config) -> Optional[PairedGuard]:
  """The paired guard of `config.xbm` (checked by `validation`), or None when
  `xbm.guard` is not "paired"; `looks` counts the evaluations of its evaluator after
  the memory's start up to `train.steps`."""
  from xbm_jax.control import controller
  from xbm_jax.train import validation_xbm
  from xbm_jax.train import eval_runner as evaluation

  x = config.xbm
  if not (x.enabled and controller.guard_rule(x.guard) == "paired"):
    return None
  name, k = validation_xbm.paired_guard_metric(config)
  total, start = int(config.train.steps), int(x.start_step)
  looks = sum(name in evaluation.due(config, s, total) for s in range(start + 1, total + 1))
  return PairedGuard(evaluator=name, k=k, alpha=float(x.guard_alpha), looks=looks)


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
  the plateau scheduler, the drift monitor, the memory controller and the paired
  guard (each but the first two may be absent) and whether the memory was pre-filled.

  The keys of `state_dict()` ("pipeline", "plateau", "prefilled", "drift",
  "controller"; "paired_guard") are those of the checkpoints written before this
  class, so they resume.
  """

  def __init__(
    self,
    *,
    plateau: PlateauHook,
    drift: Optional[DriftProbe] = None,
    memory: Optional[MemoryControl] = None,
    paired: Optional[PairedGuard] = None,
  ):
    self.plateau, self.drift, self.memory, self.paired = plateau, drift, memory, paired
    self.batches = None  # the pipeline, once built (`use_pipeline`); its position is saved
    self.pipeline = None  # a restored position, for building the pipeline

  def use_pipeline(self, batches):
    """Keeps the train pipeline built from `self.pipeline` (its position is saved with
    the rest); returns it."""
    self.batches = batches
    return batches

  def _parts(self):
    return [p for p in (self.plateau, self.drift, self.memory, self.paired) if p is not None]

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
