"""`train_and_evaluate(config, workdir)`: the run users launch from scripts/train.py.

Resume order (it matters): build everything from the config; if the workdir has
a checkpoint, restore the train state (params, BN stats, optimiser, memory and
pointer, rng, step) and the host state (pipeline position, memory controller,
plateau scheduler, drift snapshots); the writer then drops log lines newer than
the restored step. A run killed at any moment restarts from its last checkpoint
and continues exactly as if uninterrupted (the batch of step t is a pure
function of (seed, t), and the state holds everything else).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from xbm_jax import parallel, sharded_memory
from xbm_jax.data import pipeline
from xbm_jax.insight import controller as controller_lib, drift as drift_lib
from xbm_jax.train import checkpoint, evaluation, optim, setup
from xbm_jax.train import config as config_lib
from xbm_jax.train import state as state_lib, step as step_lib
from xbm_jax.train.writer import MetricWriter

NEVER = controller_lib.NEVER
LAST_VALUE_KEYS = ("memory_fill", "lr", "xbm_weight")  # states, not per-step rates


def _host_mean(pending: list) -> tuple[dict, int | None]:
  """Means of the step metrics since the last log (last values for states), and the
  first step whose loss is not finite (None if all are)."""
  stacked = jax.device_get(pending)
  losses_ = np.array([m[1]["loss"] for m in stacked])
  bad = np.flatnonzero(~np.isfinite(losses_))
  first_bad = int(stacked[bad[0]][0]) if bad.size else None
  last = stacked[-1][1]
  return {k: float(last[k]) if k in LAST_VALUE_KEYS else
          float(np.mean([m[1][k] for m in stacked])) for k in last}, first_bad


def _warm_start(state, workdir: str):
  """Params and BN statistics from another run's latest checkpoint (whatever its
  memory size) or an exported `.msgpack`, placed like this run's."""
  if workdir.endswith(".msgpack"):   # exported with scripts/export_params.py
    raw = checkpoint.load_params(workdir)
  else:
    src = checkpoint.Checkpointer(workdir, keep=1000)
    step = src.latest_step()
    if step is None:
      raise FileNotFoundError(f"config.train.init_from={workdir!r} has no checkpoint")
    raw = src.last.restore(step)["state"]   # plain arrays, no target needed
    src.close()
  out = {}
  for key in ("params", "batch_stats"):
    mine = getattr(state, key)
    theirs = raw[key]
    if jax.tree.structure(mine) != jax.tree.structure(theirs):
      raise ValueError(f"config.train.init_from={workdir!r}: its {key} do not match this "
                       "model (different config.model?)")
    out[key] = jax.tree.map(lambda m, t: jax.device_put(np.asarray(t, m.dtype), m.sharding),
                            mine, theirs)
  return state.replace(**out)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, evaluates, checkpoints and logs into `workdir`; returns the last metrics."""
  config = ml_collections.ConfigDict(config)
  mesh = parallel.make_mesh(config.train.num_devices)
  setup.validate(config, num_devices=mesh.size)
  b, p, k = setup.batch_shape(config)
  total = int(config.train.steps)
  pidx, pcount = jax.process_index(), jax.process_count()

  train_src = setup.load_source(config.input, config.input.train_split)
  channels = int(np.asarray(train_src[0]["image"]).shape[-1])
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(int(config.seed)))
  model, variables = setup.init_model(config, channels, init_rng)
  direction = optim.make_direction(config.optim)
  schedule = optim.make_schedule(config.optim, total)
  state = state_lib.create(params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=direction,
                           memory=setup.init_memory(config, mesh.size), rng=state_rng)
  sharded = config.xbm.enabled and config.xbm.memory_sharding == "sharded"
  shardings = step_lib.state_shardings(state, mesh, sharded_memory=sharded)
  state = jax.device_put(state, shardings)

  ckpt = checkpoint.Checkpointer(workdir, keep=int(config.train.keep_checkpoints),
                                 best_metric=config.train.best_metric)
  if ckpt.latest_step() is not None and ckpt.saved_memory_ptr_shape() != state.memory.ptr.shape:
    # A sharded memory saved on another device count: re-laid on restore.
    restored = ckpt.restore_resharded(state, shardings, mesh, sharded_memory=sharded)
  else:
    restored = ckpt.restore(checkpoint.abstract_like(state))
  host = {}
  if restored is not None:
    state, host = restored
  elif config.train.init_from:
    state = _warm_start(state, config.train.init_from)
  start = int(jax.device_get(state.step))

  writer = MetricWriter(workdir, resume_step=start if restored else None,
                        enabled=pidx == 0)
  if pidx == 0:
    writer.write_config(config)

  controller = controller_lib.MemoryController.from_config(config.xbm, global_batch=b)
  plateau = optim.Plateau(**{kk: v for kk, v in config.optim.plateau.items()
                             if kk != "metric"})
  monitor = None
  if config.drift.enabled:
    monitor = drift_lib.DriftMonitor(interval=int(config.drift.interval),
                                     deltas=tuple(config.drift.deltas))
  for key, obj in (("controller", controller), ("plateau", plateau), ("drift", monitor)):
    if obj is not None and key in host:
      obj.load_state_dict(host[key])

  batches = pipeline.train_batches(
      train_src, sampler={"classes_per_batch": p, "samples_per_class": k,
                          "min_class_size": int(config.input.min_class_size)},
      transform_cfg=config.input.transform, global_batch_size=b, process_index=pidx,
      process_count=pcount, worker_count=int(config.input.worker_count),
      seed=int(config.seed), state=host.get("pipeline"))
  train_step = step_lib.make_train_step(
      model=model, direction=direction, schedule=schedule,
      loss_name=config.loss.name, loss_kwargs=config_lib.set_kwargs(config.loss.kwargs),
      memory_loss_kwargs=config_lib.set_kwargs(config.xbm.memory_loss_kwargs), mesh=mesh,
      sharded_memory=sharded)
  evals = evaluation.EvalRunner(config, model, mesh, train_src=train_src, writer=writer,
                                workdir=workdir)

  def host_state(step):
    out = {"pipeline": batches.get_state(), "controller": controller.state_dict(),
           "plateau": plateau.state_dict(), "prefilled": bool(host.get("prefilled"))}
    if monitor is not None:
      out["drift"] = monitor.state_dict()
    return out

  pending, last = [], {}
  t_log, steps_since = time.time(), 0
  bar = tqdm.tqdm(total=total, initial=start, disable=not (config.train.progress and pidx == 0),
                  unit="step", dynamic_ncols=True)
  extra = {}
  for step in range(start, total):
    drift_now = None   # a reading reaches the controller once, on its own step
    if monitor is not None and step % int(config.drift.interval) == 0:
      drift_now = monitor.update(step, evals.embed_probe(state))
      extra.update(drift_now)
    mem_start, mem_weight = controller.update(step, drift_now or None)
    if not config.xbm.enabled:
      mem_start, mem_weight = NEVER, 0.0
    ctrl = {"start_step": jnp.int32(min(mem_start + 1, NEVER)),  # acts at step > start
            "xbm_weight": jnp.float32(mem_weight),
            "lr_scale": jnp.float32(plateau.scale)}
    if (config.xbm.enabled and config.xbm.prefill and not host.get("prefilled")
        and step > mem_start):
      # The paper's initialisation: fill the memory from the current model first.
      full = evals.prefill(state, train_src, size=int(config.xbm.size),
                           seed=int(config.seed) * 7919 + step)
      if sharded:
        full = sharded_memory.reshard(full, mesh.size)
      state = state.replace(memory=jax.device_put(full, shardings.memory))
      host["prefilled"] = True
    host_batch = next(batches)
    state, metrics = train_step(state, parallel.global_batch(host_batch, mesh), ctrl)
    pending.append((step, metrics))
    done, steps_since = step + 1, steps_since + 1
    bar.update(1)

    log_now = done % int(config.train.log_every) == 0 or done == total
    ckpt_now = done % int(config.train.checkpoint_every) == 0 or done == total
    eval_names = evals.due(done, total)
    if log_now or ckpt_now or eval_names:
      means, first_bad = _host_mean(pending)
      pending = []
      if first_bad is not None:
        ckpt.close()
        writer.close()
        raise FloatingPointError(
            f"non-finite loss at step {first_bad}; stopping. The last good checkpoint "
            f"is step {ckpt.latest_step()} in {workdir}")
      dt = time.time() - t_log
      scalars = {f"train/{kk}": v for kk, v in means.items()}
      scalars.update({"train/steps_per_s": steps_since / dt,
                      "train/images_per_s": steps_since * b / dt})
      if config.xbm.enabled:
        scalars.update(controller.log())
      scalars.update(extra)
      extra = {}
      writer.write_scalars(done, scalars)
      last.update(scalars)
      bar.set_postfix(loss=f"{means['loss']:.4f}", fill=f"{means['memory_fill']:.2f}")
      t_log, steps_since = time.time(), 0
    if eval_names:
      ev = evals.run(eval_names, state, done)
      last.update(ev)
      metric = config.optim.plateau.metric
      if config.optim.schedule == "plateau" and metric in ev:
        plateau.update(ev[metric])
      ckpt.save_best(done, state, host_state(done), ev)
    if ckpt_now:
      ckpt.save(done, state, host_state(done))
  bar.close()
  batches.close()
  writer.close()
  ckpt.close()
  last["train/final_step"] = float(total)
  return last
