"""Host-side control of the memory term: when it switches on and how much it weighs.

The jitted step takes two traced scalars, ``ctrl["start_step"]`` (int32) and
``ctrl["xbm_weight"]`` (float32), and enqueues and adds ``xbm_weight * L(B, M)``
only where :func:`xbm_jax.memory.active` holds (``step >= start_step`` for the
0-based update index: the reference's ``iteration > START_ITERATION`` after its
increment). Feeding them as arguments, not Python constants, means changing them
never recompiles. :class:`MemoryController` computes them each step:

* fixed start (the default, the paper's behaviour): ``start_step=<int>``, weight constant;
* ``start_step="auto"``: switch on at the first drift measurement whose estimated drift
  over the memory's span falls below ``threshold`` (glyph runs showed a memory switched
  on while embeddings still move fast collapses them: R@1 0.886 -> 0.487);
* ``ramp_steps``: the weight rises linearly, ``1 / ramp_steps`` at the first active
  update ``start``, full from ``start + ramp_steps - 1`` on;
* ``backoff``: while the memory is on, each drift measurement above
  ``backoff_threshold`` (default ``threshold``) multiplies the weight by
  ``backoff_factor`` (floor ``min_weight``); each one below it adds back
  ``weight * steps_since_last_measurement / recover_steps`` (cap ``weight``):
  additive increase, multiplicative decrease, so a full recovery from a cut takes at
  least ``recover_steps`` steps of calm while a burst of drift is damped at once.

Span drift estimate. The memory holds embeddings up to ``span = size / global_batch``
steps old. From the measured ``{delta: drift}`` we take the piecewise-linear curve
through ``(0, 0)`` and the points ``(delta, drift)`` (sorted by delta) and read it at
``span``; past the largest delta we extrapolate with that point's average rate
``drift_max / delta_max`` (drift that grows linearly with the lag, as for a random walk
of the weights, where 1 - cos ~ angle^2 / 2 ~ lag). The estimate is clipped to [0, 2].
Both decisions compare this span drift (a rate times the span, so one threshold in
units of mean 1 - cos serves both) with their threshold. For the back-off only lags
measured wholly after the switch-on count (``step - delta >= start``), since the memory
itself can speed drift up. Scale, from the glyph runs (memory 8k, batch 64, span 125):
calm training drifted 0.018 per 100 steps (span drift ~0.023), the memory at weight 1
pushed it to ~0.15 (span drift ~0.19), so a threshold near 0.05 separates the two.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np

from xbm_jax import memory as memory_lib
from xbm_jax.insight.drift import RANK_PREFIX, parse_drift_metrics

NEVER = 2**31 - 1  # the start fed while the memory is off: an int32 step never reaches it
# The rules `config.xbm.guard` names (True is "ratio"; False: no guard). "ratio" is
# this class's; "paired" lives in the trainer (`train/hooks.PairedGuard`) and
# switches the memory off through `switch_off`.
GUARD_RULES = ("ratio", "paired")


def guard_rule(guard) -> Optional[str]:
  """The rule a `config.xbm.guard` value names: "ratio", "paired" or None (off)."""
  if isinstance(guard, bool) or guard is None:
    return "ratio" if guard else None
  return str(guard)


def rank_readings(metrics: Optional[Mapping[str, float]]) -> Dict[int, float]:
  """``{lag: rank drift}`` from a DriftMonitor output (``train/rank_drift@<lag>``)."""
  out = {}
  for name, value in (metrics or {}).items():
    if name.startswith(RANK_PREFIX):
      out[int(name[len(RANK_PREFIX) :])] = float(value)
  return out


# A floor on the memory-free reading: a model that did not move at all before the
# switch-on would otherwise make any later motion count as infinitely faster.
GUARD_FLOOR = 0.01


def span_drift(drifts: Mapping[int, float], span: float) -> Optional[float]:
  """Estimated mean 1 - cos over ``span`` steps from drifts measured at some lags.

  Args:
    drifts: ``{delta (steps): mean 1 - cos}``; empty -> None.
    span: the lag to estimate at (steps, > 0).
  """
  if not drifts:
    return None
  ds = np.array(sorted(drifts), np.float64)
  vs = np.array([drifts[int(d)] for d in ds], np.float64)
  if span <= ds[-1]:
    est = float(np.interp(span, np.concatenate([[0.0], ds]), np.concatenate([[0.0], vs])))
  else:
    est = float(vs[-1] / ds[-1] * span)
  return float(np.clip(est, 0.0, 2.0))


class MemoryController:
  """Decides the memory term's start step and weight on the host (see module doc).

  Args (keyword-only):
    start_step: int (fixed; the first 0-based update using the memory, see
      :func:`xbm_jax.memory.active`) or "auto".
    weight: the full weight of the memory term (paper: 1).
    memory_size, global_batch: give the span ``memory_size / global_batch`` (steps)
      that the drift is estimated over; needed for "auto" and back-off.
    threshold: span drift (mean 1 - cos) under which "auto" switches on.
    min_auto_step: "auto" never fires before this step.
    auto_max_step: if set, "auto" switches on here at the latest.
    ramp_steps: linear ramp length after the start (0 = full weight at once).
    backoff: enable the back-off; backoff_threshold defaults to ``threshold``.
    backoff_factor: multiplier on each cut (0 < f < 1); min_weight: floor of a cut.
    recover_steps: steps of calm drift to win back a full ``weight``.
    guard: switch the memory off for good when, after the switch-on, the rank drift
      (:func:`xbm_jax.insight.drift.rank_drift`: the share of each probe's nearest
      neighbours that changed over a lag, blind to motions that keep the ranking) at
      the smallest lag exceeds ``guard_ratio`` times its last reading before the
      switch-on (the model's own, memory-free rate) in ``guard_readings`` consecutive
      readings. Off, the start fed is ``NEVER``: the step neither enqueues nor weighs
      the memory term. Needs a reading before the start (a start step >= the
      smallest drift delta; the config check refuses one that cannot act).
  """

  def __init__(
    self,
    *,
    start_step: Union[int, str] = 1000,
    weight: float = 1.0,
    memory_size: int = 0,
    global_batch: int = 1,
    threshold: Optional[float] = None,
    min_auto_step: int = 0,
    auto_max_step: Optional[int] = None,
    ramp_steps: int = 0,
    backoff: bool = False,
    backoff_threshold: Optional[float] = None,
    backoff_factor: float = 0.5,
    min_weight: float = 0.0,
    recover_steps: int = 1000,
    guard: bool = False,
    guard_ratio: float = 2.0,
    guard_readings: int = 1,
  ):
    self.auto = start_step == "auto"
    self.guard, self.guard_ratio = bool(guard), float(guard_ratio)
    self.guard_readings = int(guard_readings)
    self.base_lag, self.base_value = 0, float("nan")  # rank drift before the start
    self.guard_over = 0  # consecutive readings over the ratio
    self.guard_off = -1  # the step the guard switched the memory off
    self.weight = float(weight)
    self.span = float(memory_size) / float(global_batch)
    self.threshold = threshold
    self.min_auto_step = int(min_auto_step)
    self.auto_max_step = auto_max_step
    self.ramp_steps = int(ramp_steps)
    self.backoff = bool(backoff)
    self.backoff_threshold = backoff_threshold if backoff_threshold is not None else threshold
    self.backoff_factor = float(backoff_factor)
    self.min_weight = float(min_weight)
    self.recover_steps = int(recover_steps)
    # Mutable state (checkpointed through state_dict).
    self.start = NEVER if self.auto else int(start_step)
    self.cur_weight = self.weight  # the weight after back-off, before the ramp
    self.last_measure = -1  # step of the last drift measurement used
    self.last_span_drift = float("nan")
    self._fed_weight = 0.0

  @classmethod
  def from_config(cls, xbm, *, global_batch: int) -> "MemoryController":
    """Builds from the ``config.xbm`` section (a ConfigDict or a dict). Keys:
    ``start_step``, ``weight``, ``size``, ``threshold``, ``min_auto_step``,
    ``auto_max_step``, ``ramp_steps``, ``backoff``, ``backoff_threshold``,
    ``backoff_factor``, ``min_weight``, ``recover_steps``, ``guard``, ``guard_ratio``,
    ``guard_readings``; absent keys take the defaults above. The section was checked
    by ``xbm_jax.train.validation`` (this class trusts its arguments)."""
    get = lambda k, d=None: xbm.get(k, d)
    kw = dict(
      start_step=get("start_step", 1000),
      weight=get("weight", 1.0),
      memory_size=get("size", 0),
      global_batch=global_batch,
      threshold=get("threshold"),
      min_auto_step=get("min_auto_step", 0),
      auto_max_step=get("auto_max_step"),
      ramp_steps=get("ramp_steps", 0),
      backoff=get("backoff", False),
      backoff_threshold=get("backoff_threshold"),
      backoff_factor=get("backoff_factor", 0.5),
      min_weight=get("min_weight", 0.0),
      recover_steps=get("recover_steps", 1000),
      guard=guard_rule(get("guard", False)) == "ratio",
      guard_ratio=get("guard_ratio", 2.0),
      guard_readings=get("guard_readings", 1),
    )
    return cls(**kw)

  def _ramp(self, step: int) -> float:
    if not memory_lib.active(step, self.start):
      return 0.0
    if self.ramp_steps == 0:
      return 1.0
    return min(1.0, (step - self.start + 1) / self.ramp_steps)

  def update(
    self, step: int, drift_metrics: Optional[Dict[str, float]] = None
  ) -> Tuple[int, float]:
    """Values to feed the step numbered ``step``.

    Args:
      step: the step about to run.
      drift_metrics: the :class:`DriftMonitor` output of this step, or None on steps
        without a measurement.

    Returns:
      ``(start, weight)``: int start (``NEVER`` while off, and once the guard has
      switched the memory off) and float weight, already ramped and backed off (0.0
      while the memory is not active). Without a reading the call changes nothing
      (a resumed run repeats it at its first step).
    """
    step = int(step)
    drifts = parse_drift_metrics(drift_metrics)
    if self.auto and self.start == NEVER:
      if drifts and step >= self.min_auto_step:
        est = span_drift(drifts, self.span)
        self.last_span_drift = est
        if est < self.threshold:
          self.start = step  # fires now: this very update uses the memory
      if self.start == NEVER and self.auto_max_step is not None and step >= self.auto_max_step:
        self.start = step
    elif self.backoff and memory_lib.active(step, self.start) and drifts:
      after = {d: v for d, v in drifts.items() if step - d >= self.start}
      est = span_drift(after, self.span)
      if est is not None:
        self.last_span_drift = est
        if est > self.backoff_threshold:
          self.cur_weight = max(self.min_weight, self.cur_weight * self.backoff_factor)
        else:
          since = step - (self.last_measure if self.last_measure >= self.start else self.start)
          self.cur_weight = min(
            self.weight, self.cur_weight + self.weight * since / self.recover_steps
          )
        self.last_measure = step
    if self.guard:
      self._update_guard(step, drift_metrics)
    if self.guard_off >= 0:
      self._fed_weight = 0.0
      return NEVER, 0.0
    self._fed_weight = self._ramp(step) * self.cur_weight
    return self.start, self._fed_weight

  def switch_off(self, step: int) -> None:
    """Switches the memory off for good from the update `step` on (a guard outside
    this class decided it: the trainer's paired guard); checkpointed like the ratio
    guard's decision."""
    if self.guard_off < 0:
      self.guard_off = int(step)

  def _update_guard(self, step: int, drift_metrics) -> None:
    readings = rank_readings(drift_metrics)
    if not readings:
      return
    # A reading at step s covers the updates before s: up to the start, memory-free.
    if step <= self.start:
      self.base_lag = min(readings)
      self.base_value = readings[self.base_lag]
    elif self.guard_off < 0 and self.base_lag > 0:
      now = readings.get(self.base_lag)
      # Only a window wholly after the switch-on measures what the memory does.
      if now is not None and step - self.base_lag >= self.start:
        over = now > self.guard_ratio * max(self.base_value, GUARD_FLOOR)
        self.guard_over = self.guard_over + 1 if over else 0
        if self.guard_over >= self.guard_readings:
          self.guard_off = step

  def log(self) -> Dict[str, float]:
    """Metrics for the writer: the weight last fed, the auto start (once fired) and
    the last span-drift estimate (once made)."""
    out = {"train/xbm_weight": float(self._fed_weight)}
    if self.auto and self.start != NEVER:
      out["train/xbm_auto_start_step"] = float(self.start)
    if np.isfinite(self.last_span_drift):
      out["train/xbm_span_drift"] = float(self.last_span_drift)
    if self.guard_off >= 0:
      out["train/xbm_guard_off_step"] = float(self.guard_off)
    return out

  def state_dict(self) -> Dict[str, np.ndarray]:
    """Plain numpy scalars, for the checkpoint."""
    return {
      "start": np.asarray(self.start, np.int64),
      "cur_weight": np.asarray(self.cur_weight, np.float64),
      "last_measure": np.asarray(self.last_measure, np.int64),
      "last_span_drift": np.asarray(self.last_span_drift, np.float64),
      "fed_weight": np.asarray(self._fed_weight, np.float64),
      "base_lag": np.asarray(self.base_lag, np.int64),
      "base_value": np.asarray(self.base_value, np.float64),
      "guard_off": np.asarray(self.guard_off, np.int64),
      "guard_over": np.asarray(self.guard_over, np.int64),
    }

  def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
    """Restores :meth:`state_dict` output. A fixed start keeps the config's value
    (so ``--config.xbm.start_step=...`` on resume takes effect); "auto" keeps the saved
    firing step."""
    missing = {"start", "cur_weight", "last_measure"} - set(state)
    if missing:
      raise KeyError(f"MemoryController state lacks {sorted(missing)}")
    if self.auto:
      self.start = int(state["start"])
    self.cur_weight = min(self.weight, float(state["cur_weight"]))
    self.last_measure = int(state["last_measure"])
    self.last_span_drift = float(state.get("last_span_drift", float("nan")))
    self._fed_weight = float(state.get("fed_weight", 0.0))
    self.base_lag = int(state.get("base_lag", 0))
    self.base_value = float(state.get("base_value", float("nan")))
    self.guard_off = int(state.get("guard_off", -1))
    self.guard_over = int(state.get("guard_over", 0))
