"""The checks of `config.xbm` (the memory, its drift corrections and its controls),
called by `validation.validate`: each refuses a config that cannot act with one line
naming the key."""

from __future__ import annotations

from xbm_jax.evaluation import evaluators
from xbm_jax.control import controller
from xbm_jax.train import setup, step
from xbm_jax.train.validation_base import fail as _fail, positive as _positive


def _check_reprojection(config) -> None:
  """`xbm.reprojection` (a bool) stores pooled features, which only the memory
  term reads through the head: nothing else may read or rewrite the rows."""
  x = config.xbm
  if not isinstance(x.reprojection, bool):
    _fail(f"config.xbm.reprojection={x.reprojection!r}: True or False")
  if not x.reprojection:
    return
  if not x.enabled:
    _fail("config.xbm.reprojection=True needs the memory: config.xbm.enabled is False")


def check_memory(config, mesh: int) -> None:
  x, b = config.xbm, setup.batch_shape(config)[0]
  for key in ("moments_ema", "momentum_encoder"):
    value = x[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
      _fail(f"config.xbm.{key}={value!r}: a decay in [0, 1)")
  ema = x.moments_ema
  if ema > 0 and x.drift_correction != "moments":
    _fail(
      f"config.xbm.moments_ema={ema} smooths the moments of config.xbm.drift_correction="
      f"'moments', but it is {x.drift_correction!r}"
    )
  _check_reprojection(config)
  problem = step.freshness_conflict(  # the same rule make_train_step applies
    drift_correction=x.drift_correction,
    momentum_encoder=x.momentum_encoder,
    reprojection=bool(x.enabled and x.reprojection),
    accumulate=int(config.train.accumulate),
  )
  if problem:
    _fail(problem)
  if not x.enabled:
    if x.momentum_encoder > 0:
      _fail(
        f"config.xbm.momentum_encoder={x.momentum_encoder} needs the memory: "
        "config.xbm.enabled is False"
      )
    if x.drift_correction != "none":
      _fail(
        f"config.xbm.drift_correction={x.drift_correction!r} needs the memory: "
        "config.xbm.enabled is False"
      )
    for key in ("prefill", "guard", "backoff"):
      if x[key]:
        _fail(f"config.xbm.{key}={x[key]!r} needs the memory: config.xbm.enabled is False")
    if x.start_step == "auto":
      _fail("config.xbm.start_step='auto' needs the memory: config.xbm.enabled is False")
    if int(x.refresh_every):
      _fail("config.xbm.refresh_every needs the memory: config.xbm.enabled is False")
    return
  if int(x.size) < b:
    _fail(f"config.xbm.size={x.size} is smaller than the global batch {b}")
  if x.memory_sharding == "sharded" and int(x.size) % mesh:
    _fail(f"config.xbm.size={x.size} must divide by the {mesh} devices for a sharded memory")
  s = x.start_step
  if not (s == "auto" or (isinstance(s, int) and not isinstance(s, bool) and s >= 0)):
    _fail(f"config.xbm.start_step={s!r}: an int >= 0 or 'auto'")
  if float(x.weight) < 0:
    _fail(f"config.xbm.weight={x.weight} must be >= 0")
  _positive(config, "xbm.ramp_steps", "xbm.min_auto_step", "xbm.refresh_every", allow_zero=True)


def check_control(config) -> None:
  """The memory's controls (auto start, back-off, guard) act on drift readings: each
  needs the drift monitor and a threshold, and the guard a reading before the start."""
  x, d = config.xbm, config.drift
  if not (isinstance(x.guard, bool) or x.guard in controller.GUARD_RULES):
    _fail(f"config.xbm.guard={x.guard!r}: False, True (= 'ratio') or 'paired'")
  if not x.enabled:
    return
  rule = controller.guard_rule(x.guard)
  if rule == "paired":
    _check_paired_guard(config)
  used = [
    name
    for name, on in (
      ("start_step='auto'", x.start_step == "auto"),
      ("backoff", x.backoff),
      ("guard", rule == "ratio"),
    )
    if on
  ]
  for name in used:
    if not d.enabled:
      _fail(
        f"config.xbm.{name} acts on drift readings, but config.drift.enabled is False; "
        "enable the drift monitor"
      )
  if x.start_step == "auto" and x.threshold is None:
    _fail("config.xbm.start_step='auto' needs config.xbm.threshold")
  if x.backoff:
    if x.threshold is None and x.backoff_threshold is None:
      _fail("config.xbm.backoff needs config.xbm.threshold or config.xbm.backoff_threshold")
    if not 0.0 < float(x.backoff_factor) < 1.0:
      _fail(f"config.xbm.backoff_factor={x.backoff_factor} must be in (0, 1)")
    if not 0.0 <= float(x.min_weight) <= float(x.weight):
      _fail(f"config.xbm.min_weight={x.min_weight} must be in [0, config.xbm.weight={x.weight}]")
    _positive(config, "xbm.recover_steps")
  if rule == "ratio":
    if float(x.guard_ratio) <= 1.0:
      _fail(f"config.xbm.guard_ratio={x.guard_ratio} must be > 1")
    _positive(config, "xbm.guard_readings")
    # The guard compares with the last reading before the start: the first comes at
    # the smallest lag (a multiple of the interval).
    first = min(d.deltas)
    latest = x.start_step if x.start_step != "auto" else x.auto_max_step
    if latest is not None and int(latest) < first:
      key = "start_step" if x.start_step != "auto" else "auto_max_step"
      _fail(
        f"config.xbm.guard needs a drift reading before the memory starts, but "
        f"config.xbm.{key}={latest} comes before the first one (step {first}, the "
        "smallest of config.drift.deltas)"
      )


def paired_guard_metric(config) -> tuple[str, int]:
  """`(evaluator name, k)` of `config.xbm.guard_metric` ("eval/<name>/recall@<k>")."""
  metric = str(config.xbm.guard_metric or "")
  name, _, tail = metric[len("eval/") :].partition("/recall@")
  if not (metric.startswith("eval/") and tail.isdigit() and int(tail) >= 1):
    _fail(
      f"config.xbm.guard_metric={metric!r}: the paired guard reads an evaluator's "
      "per-query hits, named as its metric 'eval/<name>/recall@<k>'"
    )
  return name, int(tail)


def _check_paired_guard(config) -> None:
  """`xbm.guard="paired"` reads one retrieval evaluator, with a val reading before
  the memory's (fixed) start and at least one after it."""
  x = config.xbm
  name, _ = paired_guard_metric(config)
  if name not in config.evals:
    _fail(f"config.xbm.guard_metric={x.guard_metric!r} names no evaluator of config.evals")
  if evaluators.create(name, config.evals[name]).retrieval_splits() is None:
    _fail(
      f"config.xbm.guard_metric={x.guard_metric!r}: evaluator {name!r} ranks no single "
      "query set against one gallery (type leave_one_out or query_gallery)"
    )
  if not 0.0 < float(x.guard_alpha) < 0.5:
    _fail(f"config.xbm.guard_alpha={x.guard_alpha} must be in (0, 0.5) (a false-alarm rate)")
  if x.start_step == "auto":
    _fail("config.xbm.guard='paired' needs a fixed config.xbm.start_step (got 'auto')")
  total = int(config.train.steps)
  every = int(config.evals[name].get("every_steps", total))
  if min(every, total) > int(x.start_step):
    _fail(
      f"config.xbm.guard='paired' compares with the last evaluation of {name!r} before "
      f"the memory starts, but config.xbm.start_step={x.start_step} comes before the "
      f"first one (step {min(every, total)}, config.evals.{name}.every_steps)"
    )
  if int(x.start_step) >= total:
    _fail(
      f"config.xbm.guard='paired' reads after the memory starts, but "
      f"config.xbm.start_step={x.start_step} is not before config.train.steps={total}"
    )
