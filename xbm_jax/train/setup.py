"""What the loop needs before its first step: the evaluators named after the
dataset, data sources, the model and the initial train state (the config was
checked by `validation.validate` first)."""

from __future__ import annotations

from typing import Optional

import jax
import ml_collections
import numpy as np

from xbm_jax import losses, models
from xbm_jax.cross_batch import CrossBatchMemory
from xbm_jax.parallel import DATA_AXIS
from xbm_jax.data import builders
from xbm_jax.train import config as config_lib
from xbm_jax.train.errors import DataError

MEMORY_DTYPES = {"float32": jax.numpy.float32, "bfloat16": jax.numpy.bfloat16}


# Names of the datasets the library knows (and so the stock configs' evaluators).
STOCK_DATASETS = frozenset(builders.BUILDERS) | frozenset(builders.ALIASES) | {"glyphs"}


def evaluator_renames(config) -> dict:
  """`{old: new}`: the evaluators named after another stock dataset than
  `config.input.dataset`, each to be named after it (see `name_evaluators`)."""
  dataset = str(config.input.dataset)
  canonical = builders.ALIASES.get(dataset, dataset)
  return {
    n: dataset
    for n in config.evals
    if n in STOCK_DATASETS and builders.ALIASES.get(n, n) != canonical
  }


def renames_clash(config, renames: dict) -> bool:
  """Whether `renames` would give two evaluators one name (validate refuses it)."""
  return len(renames) > 1 or (bool(renames) and str(config.input.dataset) in config.evals)


def name_evaluators(config) -> None:
  """Evaluators named after a stock dataset take the name of `config.input.dataset`.

  Every evaluator scores the configured dataset, and the stock configs name theirs
  after it (`evals.glyphs` -> `eval/glyphs/recall@1`), so `--config.input.dataset=mine`
  on such a config reports `eval/mine/...`; `train.best_metric`,
  `optim.plateau.metric`, `xbm.guard_metric` and `pictures.evaluator` follow. Other
  names (`val`, `test`, yours) are kept. Command-line overrides still use the config
  file's name (`--config.evals.glyphs.every_steps=100`): this runs after them, in
  place, and is idempotent. Renames that would give two evaluators one name are left undone, for
  `validation.validate` to refuse.
  """
  renames = evaluator_renames(config)
  if not renames or renames_clash(config, renames):
    return
  ((old, new),) = renames.items()
  with config.unlocked():
    config.evals = ml_collections.ConfigDict(
      {(new if n == old else n): ev for n, ev in config.evals.items()}
    )
    metric_keys = (config.train, "best_metric"), (config.optim.plateau, "metric")
    for node, key in metric_keys + ((config.xbm, "guard_metric"),):
      if str(node[key] or "").startswith(f"eval/{old}/"):
        node[key] = f"eval/{new}/" + node[key][len(f"eval/{old}/") :]
    if config.pictures.evaluator == old:
      config.pictures.evaluator = new


def batch_shape(config) -> tuple[int, int, int]:
  """(global batch B, classes per batch P, samples per class K)."""
  b, k = int(config.input.batch_size), int(config.input.samples_per_class)
  return b, b // k, k


def split_names(input_cfg) -> list[str]:
  """The splits of the configured dataset (read from its files, no image decoded)."""
  if input_cfg.dataset == "glyphs":
    from xbm_jax.data import glyphs  # pylint: disable=g-import-not-at-top

    return sorted({**glyphs.SPLITS, **glyphs.CARVED_SPLITS, **glyphs.FEW_SHOT_SPLITS})
  _need_data_dir(input_cfg)
  from xbm_jax.data import sources  # pylint: disable=g-import-not-at-top

  try:
    return sources.splits(
      sources.ALIASES.get(input_cfg.dataset, input_cfg.dataset), input_cfg.data_dir
    )
  except FileNotFoundError as e:  # a user's path, not a bug: one line
    raise DataError(str(e).splitlines()[0] if str(e) else repr(e)) from e


def _need_data_dir(input_cfg) -> None:
  if not input_cfg.data_dir:
    raise DataError(
      f"config.input.data_dir is not set for dataset "
      f"{input_cfg.dataset!r}; prepare it with scripts/prepare_data.py "
      "--dataset ... --manual_dir ... --data_dir ..."
    )


def load_source(input_cfg, split: str):
  """The dataset split as a random-access source (see xbm_jax.data.sources)."""
  if input_cfg.dataset == "glyphs":
    from xbm_jax.data import glyphs  # pylint: disable=g-import-not-at-top

    return glyphs.load_embedded(split)
  _need_data_dir(input_cfg)
  from xbm_jax.data import sources  # pylint: disable=g-import-not-at-top

  try:
    return sources.load(input_cfg.dataset, split, input_cfg.data_dir)
  except FileNotFoundError as e:  # a user's path, not a bug: one line
    raise DataError(str(e).splitlines()[0] if str(e) else repr(e)) from e


def cross_batch_memory(config, *, feature_dim: Optional[int] = None) -> CrossBatchMemory:
  """The memory's settings and its loss, bound once from the config: `[size, embed_dim]`
  rows, or with `xbm.reprojection` `[size, feature_dim]` pooled features (the model's);
  the loss `loss.name` with `loss.kwargs` bound, the memory term's `xbm.memory_loss_kwargs`.
  A disabled memory is one of the global batch's size (never switched on)."""
  reproject = config.xbm.enabled and bool(config.xbm.reprojection)
  if reproject and feature_dim is None:
    raise ValueError("config.xbm.reprojection needs the model's feature_dim for the memory")
  sharded = config.xbm.enabled and config.xbm.memory_sharding == "sharded"
  return CrossBatchMemory(
    size=int(config.xbm.size) if config.xbm.enabled else batch_shape(config)[0],
    dim=int(feature_dim) if reproject else int(config.model.embed_dim),
    loss=losses.bind(config.loss.name, **config_lib.set_kwargs(config.loss.kwargs)),
    weight=float(config.xbm.weight),
    # start_step and weight: the host-side controller's traced gates decide each step
    # (xbm.start_step may be "auto"); these are only the object's defaults.
    memory_options=config_lib.set_kwargs(config.xbm.memory_loss_kwargs),
    dtype=MEMORY_DTYPES[config.xbm.dtype],
    ids=memory_stores_ids(config),
    axis_name=DATA_AXIS if sharded else None,
    data_axis=DATA_AXIS,
  )


def memory_stores_ids(config) -> bool:
  """Whether the memory keeps each entry's image id (its record index in the train
  split): when the memory term's self_exclusion (`xbm.memory_loss_kwargs`, else
  `loss.kwargs`) is "id"."""
  own = config.xbm.memory_loss_kwargs.get("self_exclusion")
  return (own or config.loss.kwargs.get("self_exclusion")) == "id"


def feature_dim(variables: dict) -> int:
  """F, the pooled features' width: the rows of the head's projection `[F, D]`."""
  return int(variables["params"]["head"]["fc"]["kernel"].shape[0])


def init_moments(config):
  """The smoothed batch moments of the drift correction (`TrainState.moments`), or
  None when the correction is off or uses each batch's own moments."""
  x = config.xbm
  if not (x.enabled and x.drift_correction == "moments" and float(x.moments_ema) > 0):
    return None
  from xbm_jax.freshness import moments as drift_correction

  return drift_correction.init(int(config.model.embed_dim))


def init_key_encoder(config, variables: dict):
  """The momentum encoder (`TrainState.key_encoder`), a copy of the model's
  `variables` as MoCo starts it, or None when `xbm.momentum_encoder` is 0."""
  if not (config.xbm.enabled and float(config.xbm.momentum_encoder) > 0):
    return None
  from xbm_jax.freshness import momentum

  return momentum.init(variables["params"], variables.get("batch_stats", {}))


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
