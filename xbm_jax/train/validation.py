"""`validate(config, num_devices=...)`: every check of a run's config, in one place.

The trainer calls it before the workdir lock, the data, the model or any file: a
config that cannot train (an unknown key, a value outside its set, sizes that do
not divide, a setting that cannot act) fails here with a one-line `ConfigError`
naming the key, and nothing is written. The valid names of each enumerated
setting are read from the module that defines them. The classes that consume a
section (`MemoryController`, `DriftMonitor`, the evaluators, `Plateau`) trust it.

What it cannot see here, the saved config of a resumed run, is compared after the
lock by `guards.check_resume`.
"""

from __future__ import annotations

import os

import ml_collections

from xbm_jax import losses
from xbm_jax.losses import scoring
from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.data import pipeline
from xbm_jax.evaluation import evaluators
from xbm_jax.models import factory as model_factory, head as model_head
from xbm_jax.train import config as config_lib, optim, setup, step as step_lib
from xbm_jax.train import validation_xbm
from xbm_jax.train.errors import ConfigKeyError, DataError
from xbm_jax.train.validation_base import fail as _fail, get as _get, positive as _positive

# Option values of the losses (the losses validate them inside the traced loss;
# read here so that a bad one fails before the run). self_exclusion "id": the train
# batches carry each row's record index as its image id, the memory stores them.
_LOSS_OPTIONS = {
  "reduction": scoring.REDUCTIONS,
  "self_exclusion": scoring.SELF_EXCLUSIONS,
  "mining": losses.TRIPLET_MINING,
}
# Sections whose keys are free-form: evaluator names chosen by the experiment, and a
# loss's options (checked against the loss's signature by `check_loss`).
OPEN_SECTIONS = ("evals", "loss.kwargs", "xbm.memory_loss_kwargs")


def validate(config, *, num_devices: int, check_data: bool = True) -> None:
  """Raises `ConfigError` (one line, naming the key) if `config` cannot train.

  Args:
    config: the run's ConfigDict, evaluators already named (`setup.name_evaluators`).
    num_devices: the devices visible to the run (all processes); the mesh uses
      `config.train.num_devices` of them (default: all).
    check_data: also check that the dataset and every split the run reads exist
      (reads the dataset's split list, nothing else).
  """
  check_keys(config)
  _check_evaluator_names(config)
  check_enumerated(config)
  mesh = mesh_size(config, num_devices)
  _check_batch(config, mesh)
  _check_train(config)
  check_loss(config)
  validation_xbm.check_memory(config, mesh)
  _check_drift(config)
  validation_xbm.check_control(config)
  _check_optim(config)
  _check_evals(config)
  if check_data:
    _check_splits(config)
    _check_paths(config)


def _check_evaluator_names(config) -> None:
  """`setup.name_evaluators` left no two evaluators to be given one name."""
  renames = setup.evaluator_renames(config)
  if setup.renames_clash(config, renames):
    _fail(
      f"config.evals {sorted(config.evals)}: evaluators named after a dataset are "
      f"renamed to config.input.dataset={config.input.dataset!r}, which would give two "
      "evaluators one name; rename them"
    )


def check_keys(config) -> None:
  """Unknown keys (a typo in an experiment file) are an error naming the key."""

  def walk(cfg, ref, prefix):
    for key in cfg.keys():
      path = f"{prefix}{key}"
      if any(path == s or path.startswith(s + ".") for s in OPEN_SECTIONS):
        continue
      if key not in ref:
        raise ConfigKeyError(
          f"unknown config key {path!r}; valid keys under "
          f"{prefix or 'the top level'}: {sorted(ref.keys())}"
        )
      if isinstance(ref[key], ml_collections.ConfigDict):
        walk(cfg[key], ref[key], path + ".")

  walk(config, config_lib.base(), "")


def enumerated(config) -> dict:
  """`{dotted key: valid values}` of every setting that names one of a fixed set,
  read from the modules that define the set."""
  out = {
    "xbm.dtype": tuple(setup.MEMORY_DTYPES),
    "xbm.memory_sharding": sharded_memory.MEMORY_SHARDING,
    "xbm.drift_correction": step_lib.DRIFT_CORRECTIONS,
    "optim.name": optim.OPTIMIZERS,
    "optim.schedule": optim.SCHEDULES,
    "model.name": model_factory.NAMES,
    "model.pool": model_head.POOLS,
    "model.dtype": tuple(model_factory.DTYPES),
  }
  if ":" not in str(config.loss.name):  # else an import path: check_loss resolves it
    out["loss.name"] = tuple(sorted(losses.LOSSES))
  for section in ("loss.kwargs", "xbm.memory_loss_kwargs"):
    out.update({f"{section}.{k}": v for k, v in _LOSS_OPTIONS.items()})
  out.update({f"evals.{n}.type": tuple(sorted(evaluators.REGISTRY)) for n in config.evals})
  return out


def check_enumerated(config) -> None:
  """Every enumerated setting holds one of its valid values (unset kwargs keep the
  loss's default), and every setting naming an evaluator names one."""
  for key, valid in enumerated(config).items():
    value = _get(config, key)
    if value is None and "kwargs" in key:
      continue
    if value not in valid:
      _fail(f"config.{key}={value!r} is not valid; choose one of {', '.join(map(str, valid))}")
  names = list(config.evals)
  for key in ("train.best_metric", "optim.plateau.metric"):
    metric = _get(config, key)
    if metric and not any(metric.startswith(f"eval/{n}/") for n in names):
      _fail(
        f"config.{key}={metric!r} names no evaluator; the metrics are "
        f"eval/<name>/... with <name> one of {names}"
      )
  pic = config.pictures.evaluator
  if config.pictures.enabled and pic and pic not in names:
    _fail(f"config.pictures.evaluator={pic!r} is not an evaluator; choose one of {names}")


def mesh_size(config, num_devices: int) -> int:
  """The devices the run's mesh takes (`config.train.num_devices`, default all)."""
  n = config.train.num_devices
  if n is None:
    return int(num_devices)
  if not 1 <= int(n) <= num_devices:
    _fail(f"config.train.num_devices={n}, but {num_devices} devices are visible")
  return int(n)


def _check_batch(config, mesh: int) -> None:
  b, p, k = setup.batch_shape(config)
  if k < 2:
    _fail(
      f"config.input.samples_per_class={k}: need >= 2 so that every anchor has a "
      "positive in the batch"
    )
  if b % k:
    _fail(f"config.input.batch_size={b} is not divisible by config.input.samples_per_class={k}")
  if b % mesh:
    _fail(f"config.input.batch_size={b} is not divisible by the {mesh} devices of the mesh")
  e = int(config.input.eval_batch_size)
  if e < 1 or e % mesh:
    _fail(
      f"config.input.eval_batch_size={e} is not a positive multiple of the {mesh} "
      "devices of the mesh"
    )
  _positive(config, "input.min_class_size")
  wc = config.input.worker_count
  try:
    pipeline.resolve_worker_count(wc)
  except (TypeError, ValueError):
    _fail(
      f"config.input.worker_count={wc!r}: an int >= 0, -1 or 'auto' (one worker per core but one)"
    )
  # With accumulation each device's rows split into micro-batches of whole classes
  # (K rows each), so that every anchor of a micro-batch has its positives.
  n, rows = config.train.accumulate, b // mesh
  if not isinstance(n, int) or n < 1 or (n > 1 and (rows % n or (rows // n) % k)):
    _fail(
      f"config.train.accumulate={n}: each device's {rows} rows must split into {n} "
      f"micro-batches of whole classes (config.input.samples_per_class={k} rows each)"
    )


def _check_train(config) -> None:
  _positive(config, "train.steps", "train.log_every", "train.checkpoint_every")
  _positive(config, "train.keep_checkpoints", "model.embed_dim")


def check_loss(config) -> None:
  """`config.loss.name` (a built-in name or "pkg.module:function") resolves, and it
  takes every option set in `loss.kwargs` and `xbm.memory_loss_kwargs`."""
  try:
    loss_fn = losses.resolve(config.loss.name)
  except (TypeError, ValueError) as e:
    _fail(f"config.loss.name={config.loss.name!r}: {e}")
  for section in ("loss.kwargs", "xbm.memory_loss_kwargs"):
    for key in config_lib.set_kwargs(_get(config, section)):
      try:
        losses.check_loss_options(loss_fn, [key])
      except TypeError as e:
        _fail(f"config.{section}.{key} is not an option of the {config.loss.name!r} loss: {e}")


def _check_drift(config) -> None:
  d = config.drift
  if not d.enabled:
    return
  _positive(config, "drift.interval")
  if int(d.probe_size) < 2:
    _fail(f"config.drift.probe_size={d.probe_size}: need >= 2 probe images")
  deltas = list(d.deltas)
  if not deltas:
    _fail("config.drift.deltas is empty; give at least one lag")
  for delta in deltas:
    if int(delta) <= 0 or int(delta) % int(d.interval):
      _fail(
        f"config.drift.deltas: {delta} is not a positive multiple of "
        f"config.drift.interval={d.interval}"
      )


def _check_optim(config) -> None:
  o = config.optim
  if float(o.lr) < 0:
    _fail(f"config.optim.lr={o.lr} must be >= 0")
  _positive(config, "optim.warmup_steps", allow_zero=True)
  if o.schedule == "step":
    _positive(config, "optim.decay_every")
  if o.schedule == "plateau":
    if not o.plateau.metric:
      _fail(
        "config.optim.schedule='plateau' needs config.optim.plateau.metric "
        "(an eval metric name such as 'eval/sop/recall@1')"
      )
    if not 0.0 < float(o.plateau.factor) < 1.0:
      _fail(f"config.optim.plateau.factor={o.plateau.factor} must be in (0, 1)")
    _positive(config, "optim.plateau.patience")


def _check_evals(config) -> None:
  for name, ev in config.evals.items():
    cls = evaluators.REGISTRY[ev["type"]]  # the type is enumerated
    unknown = set(ev.keys()) - cls.allowed_keys
    if unknown:
      _fail(
        f"config.evals.{name}: unknown key(s) {sorted(unknown)} for type {ev['type']!r}; "
        f"allowed: {sorted(cls.allowed_keys)}"
      )
    for key in sorted(cls.required_keys):
      if not ev.get(key):
        _fail(f"config.evals.{name}.{key} is required for type {ev['type']!r}")
    ks = ev.get("ks")
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
      _fail(f"config.evals.{name}.ks={ks!r}: a non-empty sequence of K >= 1 for Recall@K")
    every = ev.get("every_steps", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
      _fail(f"config.evals.{name}.every_steps={every!r} must be a positive int")
  p = config.pictures
  if p.enabled:
    _positive(config, "pictures.num_queries", "pictures.top_k")


def _check_splits(config) -> None:
  """The dataset, its train split and every split an evaluator reads exist."""
  have = setup.split_names(config.input)
  wanted = [("config.input.train_split", config.input.train_split)]
  for name, ev in config.evals.items():
    wanted += [(f"config.evals.{name}", s) for s in evaluators.create(name, ev).split_names()]
  for key, split in wanted:
    if split not in have:
      _fail(
        f"{key}: no split {split!r} in dataset {config.input.dataset!r}; splits: {sorted(have)}"
      )


def _check_paths(config) -> None:
  """The warm start and the pretrained backbone exist (read by the run, never written)."""
  src = config.train.init_from
  if src and src.endswith(".msgpack"):
    if not os.path.isfile(src):
      raise DataError(f"config.train.init_from={src!r}: no such file")
  elif src:
    last = os.path.join(src, "checkpoints", "last")
    if not os.path.isdir(last) or not any(d.isdigit() for d in os.listdir(last)):
      raise DataError(f"config.train.init_from={src!r} has no checkpoint (no {last}/<step>)")
  if config.model.init_from and not os.path.isfile(config.model.init_from):
    raise DataError(f"config.model.init_from={config.model.init_from!r}: no such file")
