"""`train_and_evaluate(config, workdir)`: the run users launch from scripts/train.py.

Resume order (it matters): build everything from the config; if the workdir has
a checkpoint, restore the train state (params, BN stats, optimiser, memory and
pointer, step) and the host state (pipeline position, memory controller,
plateau scheduler, drift snapshots); the writer then drops log lines newer than
the restored step. Everything that belongs to update t (its drift reading, the
controller's decision on it, its log line, its evaluation) happens before the
checkpoint of step t, so a resume neither repeats nor loses any of it. A run killed at any moment restarts from its last checkpoint
and continues exactly as if uninterrupted (the batch of step t is a pure
function of (seed, t), and the state holds everything else).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xbm_jax import parallel
from xbm_jax.data import pipeline
from xbm_jax.insight import drift as drift_lib
from xbm_jax.control import controller as controller_lib
from xbm_jax.train import checkpoint, guards, hooks as hooks_lib, optim, preemption
from xbm_jax.train import eval_runner as evaluation
from xbm_jax.train import setup
from xbm_jax.train import validation
from xbm_jax.train import state as state_lib, step as step_lib
from xbm_jax.train.errors import NonFiniteError
from xbm_jax.train.progress import Progress
from xbm_jax.train.metrics_writer import MetricWriter

NEVER = controller_lib.NEVER
LAST_VALUE_KEYS = ("memory_fill", "lr", "xbm_weight")  # states, not per-step rates


def _host_mean(pending: list) -> tuple[dict, int | None]:
  """Means of the step metrics since the last log (last values for states), and the
  first step with anything non-finite (loss, gradients, updates, parameters), or
  None if all are finite."""
  stacked = jax.device_get(pending)
  bad_flags = np.array(
    [float(m[1].get("nonfinite", 0.0)) > 0 or not np.isfinite(m[1]["loss"]) for m in stacked]
  )
  bad = np.flatnonzero(bad_flags)
  first_bad = int(stacked[bad[0]][0]) if bad.size else None
  last = stacked[-1][1]
  return {
    k: float(last[k]) if k in LAST_VALUE_KEYS else float(np.mean([m[1][k] for m in stacked]))
    for k in last
    if k != "nonfinite"
  }, first_bad


def _restore(ckpt, state, mesh, *, sharded: bool, workdir: str):
  """`(state, host)` from the workdir's newest intact checkpoint, or None; one that
  does not fit this config is one line (ResumeError), a damaged one is moved aside
  (`Checkpointer.restore_newest`)."""
  del workdir  # named by the checkpointer's messages

  def read(step):
    if sharded and ckpt.saved_memory_ptr_shape(step) != state.memory.ptr.shape:
      # A sharded memory saved on another device count: re-laid on restore.
      return ckpt.restore_resharded(state, mesh, step)
    return ckpt.restore(checkpoint.abstract_like(state), step)

  return ckpt.restore_newest(read, checkpoint.abstract_like(state))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates, checkpoints and logs into `workdir`; returns the last metrics.

  Checks first, in this order: the config, every rule (`validation.validate`,
  before the lock, the data or any file), the workdir lock (one live run per
  workdir), and on a resume the saved config against this one. Whatever ends the run (the last step,
  a non-finite loss, any exception, a stop signal), one ExitStack closes everything
  it opened: progress bar, pipeline workers, writer, checkpoint manager, lock, the
  signal handlers. SIGTERM or SIGINT: the step under way finishes and is
  checkpointed, then `Preempted` (a SystemExit, status 128 + signal).
  """
  config = ml_collections.ConfigDict(config)  # a copy: the caller's stays as given
  guards.expand_paths(config)
  setup.name_evaluators(config)
  workdir = guards.expand_path(workdir)
  validation.validate(config, num_devices=jax.device_count())
  mesh = parallel.make_mesh(config.train.num_devices)
  with contextlib.ExitStack() as stack:
    stack.enter_context(guards.WorkdirLock(workdir, jax.process_index()))
    stop = stack.enter_context(preemption.StopSignals())
    run = _build(config, workdir, mesh, stack)
    return _train(run, stop)


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything the loop needs, built once by `_build` (the train state it starts
  from is `state`; the loop keeps its own)."""

  config: Any
  workdir: str
  state: Any
  start: int
  total: int
  global_batch: int
  ckpt: checkpoint.Checkpointer
  writer: MetricWriter
  batches: Any
  train_step: Callable
  evals: evaluation.EvalRunner
  progress: Progress
  host: hooks_lib.HostState
  watch: guards.CollapseWatch
  pending: list  # step metrics not logged before a stop signal's checkpoint


def _build_state(config, mesh, train_src):
  """The model, its optimiser direction, a fresh train state placed on the mesh, its
  shardings, and the memory's settings (`CrossBatchMemory`, built once from the config:
  the state's memory and the train step both come from it)."""
  channels = int(np.asarray(train_src[0]["image"]).shape[-1])
  # The first key of the seed's split, as when the state also kept a key: a seed
  # initialises the model as it did then.
  init_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))[0]
  model, variables = setup.init_model(config, channels, init_rng)
  direction = optim.make_direction(config.optim)
  xbm = setup.cross_batch_memory(config, feature_dim=setup.feature_dim(variables))
  sharded = xbm.axis_name is not None
  state = state_lib.create(
    params=variables["params"],
    batch_stats=variables.get("batch_stats", {}),
    tx=direction,
    memory=xbm.init(n_shards=mesh.size) if sharded else xbm.init(),
    moments=setup.init_moments(config),
    key_encoder=setup.init_key_encoder(config, variables),
  )
  shardings = step_lib.state_shardings(state, mesh, sharded_memory=sharded)
  return model, direction, jax.device_put(state, shardings), shardings, xbm


def _host_state(config, evals, train_src, shardings, mesh, *, sharded, watch, b):
  """The drift probe (if on), the memory control (if the memory is on) and the
  plateau scheduler."""
  drift = memory = None
  if config.drift.enabled:
    monitor = drift_lib.DriftMonitor(
      interval=int(config.drift.interval), deltas=tuple(config.drift.deltas)
    )
    drift = hooks_lib.DriftProbe(
      monitor, interval=int(config.drift.interval), embed_probe=evals.embed_probe, watch=watch
    )
  if config.xbm.enabled:
    controller = controller_lib.MemoryController.from_config(config.xbm, global_batch=b)
    prefill = (
      hooks_lib.make_prefill(config, evals, train_src, shardings, mesh, sharded=sharded)
      if config.xbm.prefill or config.xbm.refresh_every
      else None
    )
    memory = hooks_lib.MemoryControl(
      controller, prefill_fn=prefill, refresh_every=int(config.xbm.refresh_every)
    )
  plateau = optim.Plateau(**{k: v for k, v in config.optim.plateau.items() if k != "metric"})
  metric = config.optim.plateau.metric if config.optim.schedule == "plateau" else ""
  return hooks_lib.HostState(
    plateau=hooks_lib.PlateauHook(plateau, metric=metric),
    drift=drift,
    memory=memory,
    paired=hooks_lib.make_paired_guard(config),
  )


def _pipeline(config, train_src, mesh, position, stack: contextlib.ExitStack):
  """This process's batches from `position` (a restored one, or None: step 0);
  both the grain iterator (its workers) and the prefetch thread close with `stack`."""
  b, p, k = setup.batch_shape(config)
  batches = pipeline.train_batches(
    train_src,
    sampler={
      "classes_per_batch": p,
      "samples_per_class": k,
      "min_class_size": int(config.input.min_class_size),
    },
    transform_cfg=config.input.transform,
    global_batch_size=b,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    worker_count=config.input.worker_count,
    seed=int(config.seed),
    state=position,
  )
  stack.callback(batches.close)
  # Host batches become global arrays (this process's rows on its devices) two steps
  # ahead in a thread; get_state() is as of the batches handed out, so resume is exact.
  out = pipeline.prefetch_to_device(batches, lambda hb: parallel.global_batch(hb, mesh), size=2)
  stack.callback(out.close)
  return out


def _build(config, workdir: str, mesh, stack: contextlib.ExitStack) -> Run:
  """Builds the run; each resource it opens is registered with `stack` at once."""
  b = setup.batch_shape(config)[0]
  total = int(config.train.steps)
  pidx = jax.process_index()
  changes = guards.check_resume_config(config, workdir)
  train_src = setup.load_source(config.input, config.input.train_split)
  model, direction, state, shardings, xbm = _build_state(config, mesh, train_src)
  sharded = xbm.axis_name is not None
  if config.train.init_from and not checkpoint.saved_steps(workdir):
    # Before the checkpoint manager: a source that does not fit this model is refused
    # with nothing written but the lock.
    state = checkpoint.warm_start(state, config.train.init_from)
  ckpt = checkpoint.Checkpointer(
    workdir, keep=int(config.train.keep_checkpoints), best_metric=config.train.best_metric
  )
  stack.callback(ckpt.close)

  restored = _restore(ckpt, state, mesh, sharded=sharded, workdir=workdir)
  saved_host = {}
  if restored is not None:
    state, saved_host = restored
  start = int(jax.device_get(state.step))

  # No checkpoint: any rows are a killed attempt's, which this run writes again.
  writer = MetricWriter(workdir, resume_step=start if restored else -1, enabled=pidx == 0)
  stack.callback(writer.close)
  if pidx == 0:
    writer.write_config(config)
  if changes:
    writer.write_text(start, "config_change", changes)

  progress = Progress(
    total=total,
    start=start,
    enabled=bool(config.train.progress) and pidx == 0,
    eval_steps=[s for s in range(start + 1, total + 1) if evaluation.due(config, s, total)],
  )
  stack.callback(progress.close)
  evals = evaluation.EvalRunner(
    config, model, mesh, train_src=train_src, writer=writer, workdir=workdir, say=progress.write
  )
  watch = guards.CollapseWatch()
  host = _host_state(config, evals, train_src, shardings, mesh, sharded=sharded, watch=watch, b=b)
  host.load_state_dict(saved_host)

  batches = host.use_pipeline(_pipeline(config, train_src, mesh, host.pipeline, stack))
  train_step = step_lib.make_train_step(
    model=model,
    direction=direction,
    schedule=optim.make_schedule(config.optim, total),
    xbm=xbm,
    mesh=mesh,
    accumulate=int(config.train.accumulate),
    drift_correction=config.xbm.drift_correction,
    moments_ema=float(config.xbm.moments_ema),
    momentum_encoder=float(config.xbm.momentum_encoder),
    reprojection=bool(config.xbm.enabled and config.xbm.reprojection),
  )
  return Run(
    config=config,
    workdir=workdir,
    state=state,
    start=start,
    total=total,
    global_batch=b,
    ckpt=ckpt,
    writer=writer,
    batches=batches,
    train_step=train_step,
    evals=evals,
    progress=progress,
    host=host,
    watch=watch,
    pending=preemption.restore_pending(saved_host),
  )


def _memory_controls(run: Run, step: int, reading: dict) -> tuple[int, float]:
  """`(start, weight)` of the update `step`, from the reading taken just before it;
  without the memory control the memory stays off."""
  if run.host.memory is None:
    return NEVER, 0.0
  return run.host.memory.controls(step, reading)


def _measure(run: Run, done: int, state) -> dict:
  """The drift reading after `done` updates (`{}` if none), logged at `done` itself:
  it measures the model after `done` updates."""
  if run.host.drift is None:
    return {}
  reading = run.host.drift.measure(done, state)
  if reading:
    run.writer.write_scalars(done, reading)
  return reading


def _stop_if_non_finite(run: Run, first_bad) -> None:
  """NonFiniteError naming the first non-finite step (None: all finite) and the last
  good checkpoint."""
  if first_bad is not None:
    good = run.ckpt.latest_step()
    raise NonFiniteError(
      f"non-finite loss, gradients or parameters at step {first_bad}; stopping. "
      + (
        f"The last good checkpoint is step {good} in {run.workdir}"
        if good is not None
        else "No checkpoint was saved"
      )
      + " (a too large learning rate?)"
    )


def _log(run: Run, pending: list, done: int, steps: int, seconds: float) -> dict:
  """Writes the means of the pending step metrics, or stops on a non-finite one."""
  means, first_bad = _host_mean(pending)
  _stop_if_non_finite(run, first_bad)
  # The controller's state (auto start, span drift, guard); the weight the logged
  # updates used is the step's own `xbm_weight` (the controller already holds the
  # next update's).
  scalars = dict(run.host.memory.log()) if run.host.memory is not None else {}
  scalars.update({f"train/{kk}": v for kk, v in means.items()})
  scalars.update(
    {"train/steps_per_s": steps / seconds, "train/images_per_s": steps * run.global_batch / seconds}
  )
  run.writer.write_scalars(done, scalars)
  run.watch.grad_norm(done, means["grad_norm"])
  run.progress.postfix(loss=f"{means['loss']:.4f}", fill=f"{means['memory_fill']:.2f}")
  return scalars


def _evaluate(run: Run, state, names: list, done: int) -> dict:
  """Runs the due evaluators, steps the plateau scheduler and the paired guard (which
  may switch the memory off), keeps the best checkpoint."""
  t_eval = time.time()
  guard = run.host.paired
  hits_of = guard.hits_wanted() if guard is not None else {}  # per-query hits for the guard
  ev = run.evals.run(names, state, done, hits_of=hits_of)
  run.progress.evaluated(time.time() - t_eval)
  run.host.plateau.after_eval(ev)
  if guard is not None and guard.live:
    control = run.host.memory.controller
    verdict = guard.after_eval(done, control.start, run.evals.hits.get(guard.evaluator))
    if verdict:
      run.writer.write_scalars(done, verdict)
    if not guard.live:  # fired: off from the next update on, for good (checkpointed)
      control.switch_off(done)
  run.ckpt.save_best(done, state, run.host.state_dict(), ev)
  return ev


def _train(run: Run, stop: preemption.StopSignals) -> dict:
  """The loop: the step, then after update `done` the drift reading, the controls of
  the next update, and at their steps the log, evaluation, checkpoint; on a stop
  signal, a checkpoint of `done` and `Preempted`."""
  cfg, state = run.config.train, run.state
  pending, last = list(run.pending), {}
  t_log, steps_since = time.time(), 0
  start, weight = _memory_controls(run, run.start, _measure(run, run.start, state))
  for step in range(run.start, run.total):
    if run.host.memory is not None:
      state = run.host.memory.prefill(step, state, start)
    # Traced scalars: switching the memory or the learning rate never recompiles.
    ctrl = {
      "start_step": jnp.int32(start),
      "xbm_weight": jnp.float32(weight),
      "lr_scale": jnp.float32(run.host.plateau.scale),
    }
    state, metrics = run.train_step(state, next(run.batches), ctrl)
    pending.append((step, metrics))
    done, steps_since = step + 1, steps_since + 1
    run.progress.update()
    start, weight = _memory_controls(run, done, _measure(run, done, state))

    log_now = done % int(cfg.log_every) == 0 or done == run.total
    ckpt_now = done % int(cfg.checkpoint_every) == 0 or done == run.total
    eval_names = evaluation.due(run.config, done, run.total)
    if log_now or ckpt_now or eval_names:
      last.update(_log(run, pending, done, steps_since, time.time() - t_log))
      pending, t_log, steps_since = [], time.time(), 0
    if eval_names:
      last.update(_evaluate(run, state, eval_names, done))
      t_log = time.time()  # steps_per_s counts steps, not the evaluation
      if run.host.paired is not None and run.host.paired.off_step == done:
        start, weight = _memory_controls(run, done, {})  # the paired guard fired
    if ckpt_now:
      run.ckpt.save(done, state, run.host.state_dict())
    if stop.reached(done):  # every process at the same `done`
      _stop_if_non_finite(run, _host_mean(pending)[1] if pending else None)
      host = {**run.host.state_dict(), **preemption.pending_state(jax.device_get(pending))}
      run.ckpt.save(done, state, host)
      raise preemption.stopped(done, stop.signum)
  last["train/final_step"] = float(run.total)
  return last
