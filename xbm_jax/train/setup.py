"""What the loop needs before its first step: config checks, data sources, the
model and the initial train state. Every check here runs before any state is
created or any file is written."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from xbm_jax import losses, memory, models
from xbm_jax.data import builders
from xbm_jax.evaluation import evaluators as evaluators_lib
from xbm_jax.models import factory as model_factory, head as model_head
from xbm_jax.train import config as config_lib, optim
from xbm_jax.train.errors import ConfigError, DataError

MEMORY_SHARDINGS = ("replicated", "sharded")
MEMORY_DTYPES = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16}
_LOSS_OPTIONS = {
  "reduction": ("paper", "mean"),
  "self_exclusion": ("similarity", "index", "none"),
  "mining": ("hard", "semihard", "all"),
}


def enumerated(config) -> dict:
  """`{dotted key: valid values}` of every setting that names one of a fixed set,
  read from the modules that define the set."""
  out = {
    "xbm.dtype": tuple(MEMORY_DTYPES),
    "xbm.memory_sharding": MEMORY_SHARDINGS,
    "optim.name": optim.OPTIMIZERS,
    "optim.schedule": optim.SCHEDULES,
    "model.name": model_factory.NAMES,
    "model.pool": model_head.POOLS,
    "model.dtype": tuple(model_factory.DTYPES),
  }
  if ":" not in str(config.loss.name):  # else an import path: validate() resolves it
    out["loss.name"] = tuple(sorted(losses.LOSSES))
  for section in ("loss.kwargs", "xbm.memory_loss_kwargs"):
    out.update({f"{section}.{k}": v for k, v in _LOSS_OPTIONS.items()})
  out.update(
    {f"evals.{name}.type": tuple(sorted(evaluators_lib.REGISTRY)) for name in config.evals}
  )
  return out


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def check_enumerated(config) -> None:
  """Every enumerated setting holds one of its valid values (unset kwargs keep the
  loss's default)."""
  for key, valid in enumerated(config).items():
    value = _get(config, key)
    if value is None and "kwargs" in key:
      continue
    if value not in valid:
      raise ConfigError(
        f"config.{key}={value!r} is not valid; choose one of {', '.join(map(str, valid))}"
      )
  names = list(config.evals)
  for key in ("train.best_metric", "optim.plateau.metric"):
    metric = _get(config, key)
    if metric and not any(metric.startswith(f"eval/{n}/") for n in names):
      raise ConfigError(
        f"config.{key}={metric!r} names no evaluator; the metrics are "
        f"eval/<name>/... with <name> one of {names}"
      )
  pic = config.pictures.evaluator
  if config.pictures.enabled and pic and pic not in names:
    raise ConfigError(
      f"config.pictures.evaluator={pic!r} is not an evaluator; choose one of {names}"
    )


# Names of the datasets the library knows (and so the stock configs' evaluators).
STOCK_DATASETS = frozenset(builders.BUILDERS) | frozenset(builders.ALIASES) | {"glyphs"}


def name_evaluators(config) -> None:
  """Evaluators named after a stock dataset take the name of `config.input.dataset`.

  Every evaluator scores the configured dataset, and the stock configs name theirs
  after it (`evals.glyphs` -> `eval/glyphs/recall@1`), so `--config.input.dataset=mine`
  on such a config reports `eval/mine/...`; `train.best_metric`,
  `optim.plateau.metric` and `pictures.evaluator` follow. Other names (`val`, `test`,
  yours) are kept. Command-line overrides still use the config file's name
  (`--config.evals.glyphs.every_steps=100`): this runs after them, in place, and is
  idempotent.
  """
  dataset = str(config.input.dataset)
  canonical = builders.ALIASES.get(dataset, dataset)
  renames = {
    n: dataset
    for n in config.evals
    if n in STOCK_DATASETS and builders.ALIASES.get(n, n) != canonical
  }
  if not renames:
    return
  if len(renames) > 1 or dataset in config.evals:
    raise ConfigError(
      f"config.evals {sorted(config.evals)}: evaluators named after a "
      f"dataset are renamed to config.input.dataset={dataset!r}, which "
      "would give two evaluators one name; rename them"
    )
  ((old, new),) = renames.items()
  with config.unlocked():
    config.evals = ml_collections.ConfigDict(
      {(new if n == old else n): ev for n, ev in config.evals.items()}
    )
    for node, key in ((config.train, "best_metric"), (config.optim.plateau, "metric")):
      if str(node[key] or "").startswith(f"eval/{old}/"):
        node[key] = f"eval/{new}/" + node[key][len(f"eval/{old}/") :]
    if config.pictures.evaluator == old:
      config.pictures.evaluator = new


def batch_shape(config) -> tuple[int, int, int]:
  """(global batch B, classes per batch P, samples per class K)."""
  b, k = int(config.input.batch_size), int(config.input.samples_per_class)
  return b, b // k, k


def validate(config, *, num_devices: int) -> None:
  """Clear errors for a config that cannot train, before training starts. First names
  the evaluators after the dataset (`name_evaluators`, in place)."""
  config_lib.check(config)
  name_evaluators(config)
  check_enumerated(config)
  b, k = int(config.input.batch_size), int(config.input.samples_per_class)
  if k < 2:
    raise ConfigError(
      f"config.input.samples_per_class={k}: need >= 2 so that every "
      "anchor has a positive in the batch"
    )
  if b % k:
    raise ConfigError(
      f"config.input.batch_size={b} is not divisible by config.input.samples_per_class={k}"
    )
  if b % num_devices:
    raise ConfigError(
      f"config.input.batch_size={b} is not divisible by the {num_devices} devices of the mesh"
    )
  if int(config.input.eval_batch_size) % num_devices:
    raise ConfigError(
      f"config.input.eval_batch_size={config.input.eval_batch_size} is not "
      f"divisible by the {num_devices} devices of the mesh"
    )
  check_loss(config)
  x = config.xbm
  if x.enabled:
    if int(x.size) < b:
      raise ConfigError(f"config.xbm.size={x.size} is smaller than the global batch {b}")
    if x.memory_sharding == "sharded" and int(x.size) % num_devices:
      raise ConfigError(
        f"config.xbm.size={x.size} must divide by the {num_devices} devices for a sharded memory"
      )
    if not (x.start_step == "auto" or isinstance(x.start_step, int)):
      raise ConfigError(f"config.xbm.start_step={x.start_step!r}: an int or 'auto'")
  if config.optim.schedule == "plateau" and not config.optim.plateau.metric:
    raise ConfigError(
      "config.optim.schedule='plateau' needs config.optim.plateau.metric "
      "(an eval metric name such as 'eval/sop/recall@1')"
    )
  for name, ev in config.evals.items():
    if int(ev.get("every_steps", 1)) <= 0:
      raise ConfigError(f"config.evals.{name}.every_steps must be positive")


def check_loss(config) -> None:
  """`config.loss.name` (a built-in name or "pkg.module:function") resolves, and it
  takes every option set in `loss.kwargs` and `xbm.memory_loss_kwargs`."""
  try:
    loss_fn = losses.resolve(config.loss.name)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.loss.name={config.loss.name!r}: {e}") from None
  for section in ("loss.kwargs", "xbm.memory_loss_kwargs"):
    head, tail = section.split(".")
    for key in config_lib.set_kwargs(config[head][tail]):
      try:
        losses.check_loss_options(loss_fn, [key])
      except TypeError as e:
        raise ConfigError(f"config.{section}.{key} is not an option of the loss: {e}") from None


def load_source(input_cfg, split: str):
  """The dataset split as a random-access source (see xbm_jax.data.sources)."""
  if input_cfg.dataset == "glyphs":
    from xbm_jax.data import glyphs  # pylint: disable=g-import-not-at-top

    return glyphs.load_embedded(split)
  if not input_cfg.data_dir:
    raise DataError(
      f"config.input.data_dir is not set for dataset "
      f"{input_cfg.dataset!r}; prepare it with scripts/prepare_data.py "
      "--dataset ... --manual_dir ... --data_dir ..."
    )
  from xbm_jax.data import sources  # pylint: disable=g-import-not-at-top

  try:
    return sources.load(input_cfg.dataset, split, input_cfg.data_dir)
  except FileNotFoundError as e:  # a user's path, not a bug: one line
    raise DataError(str(e).splitlines()[0] if str(e) else repr(e)) from e


def init_memory(config, num_devices: int):
  dim = int(config.model.embed_dim)
  dtype = MEMORY_DTYPES[config.xbm.dtype]
  size = int(config.xbm.size) if config.xbm.enabled else batch_shape(config)[0]
  if config.xbm.enabled and config.xbm.memory_sharding == "sharded":
    from xbm_jax import sharded_memory  # pylint: disable=g-import-not-at-top

    return sharded_memory.init(size=size, dim=dim, n_shards=num_devices, dtype=dtype)
  return memory.init(size=size, dim=dim, dtype=dtype)


def init_model(config, channels: int, rng):
  from xbm_jax.parallel import DATA_AXIS  # pylint: disable=g-import-not-at-top

  # BatchNorm statistics are averaged over the data-parallel axis in train mode;
  # in eval mode the same module uses its running statistics.
  model = models.create(config.model, axis_name=DATA_AXIS)
  variables = models.init_variables(
    model,
    rng,
    image_size=int(config.input.transform.crop),
    channels=channels,
    init_from=config.model.init_from,
  )
  return model, variables


def probe_indices(n: int, size: int, seed: int) -> np.ndarray:
  """A fixed probe set of training images for the drift measurement."""
  rng = np.random.default_rng(seed + 12345)
  return np.sort(rng.choice(n, size=min(size, n), replace=False))
