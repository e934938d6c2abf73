"""The config skeleton every experiment shares: every key the trainer reads, with
its default, in grouped sub-dicts. Experiment files in `configs/` start from
`base()` and override; `parse_arg` reads `get_config("smoke,seed=1")` arguments.
`validation.validate` refuses a key absent here (a typo) before training starts.
"""

from __future__ import annotations

import inspect

import ml_collections
from ml_collections import config_dict

from xbm_jax import losses, models
from xbm_jax.train.errors import ConfigError


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """`"smoke,seed=1"` -> ConfigDict(smoke=True, seed=1), typed by `defaults`."""
  out = ml_collections.ConfigDict(dict(defaults))
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key not in defaults:
      raise ConfigError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
    default = defaults[key]
    if not value:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(value)
  return out


# Keyword arguments of the losses that the step passes, not options a config sets.
_CALL_ARGS = ("self_index", "return_stats", "axis_name", "data_axis", "denominator")


def loss_kwargs_fields() -> dict:
  """Every keyword option of the losses, read from their signatures, unset
  (`--config.loss.kwargs.margin=0.3`); a str default makes a str option, any other
  (a number, or None as for pos_threshold) a float."""
  out = {}
  for fn in losses.LOSSES.values():
    for p in inspect.signature(fn).parameters.values():
      if p.kind == p.KEYWORD_ONLY and p.name not in _CALL_ARGS:
        out[p.name] = config_dict.placeholder(str if isinstance(p.default, str) else float)
  return out


def set_kwargs(cfg) -> dict:
  """The options of a kwargs section that are set (not None)."""
  return {k: v for k, v in cfg.items() if v is not None}


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.input = dict(
    dataset="glyphs",  # 'glyphs' (embedded) or a prepared tfds name
    data_dir=config_dict.placeholder(str),
    train_split="train",
    batch_size=64,  # global batch B = P classes x K samples
    samples_per_class=4,  # K (P = B / K)
    min_class_size=1,
    # grain worker processes: an int >= 0, or -1 / "auto" (one per core but one)
    worker_count=config_dict.FieldReference(0, field_type=object),
    transform=dict(resize=256, crop=224, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=True),
    eval_batch_size=128,  # must divide by the device count
  )
  c.model = models.default_config()

  # kwargs: the loss's keyword options; unset (None) ones keep the loss's defaults.
  # name: a built-in loss, or an import path "mypkg.losses:my_loss" (a pair loss of
  # xbm_jax.losses.pairs, or a plain f(query, reference, **kwargs)).
  c.loss = dict(name="contrastive", kwargs=loss_kwargs_fields())

  c.xbm = dict(
    enabled=True,
    size=55_000,  # memory slots (>= global batch)
    # int, or "auto" (switch on when drift is slow): the first 0-based update that
    # enqueues and uses the memory (xbm_jax.memory.active; the reference's
    # `iteration > START_ITERATION`, so 1000 -> first used at update 1001).
    start_step=config_dict.FieldReference(1000, field_type=object),
    weight=1.0,  # w in L(B, B) + w * L(B, M)
    dtype="float32",  # memory storage: float32 | bfloat16
    memory_sharding="replicated",  # replicated | sharded
    prefill=False,  # fill the memory from the model at the start
    # > 0: fill it again from the current model every this many updates (implies
    # prefill; the fresh-memory oracle of benchmarks/xbm_study.py, costs one embedding
    # pass over `size` training images per refill).
    refresh_every=0,
    # Overrides for the memory term only, e.g. reduction="mean" (average the
    # memory term over its active pairs instead of the paper's sum / anchors).
    memory_loss_kwargs=loss_kwargs_fields(),
    ramp_steps=0,
    threshold=0.05,  # drift threshold for "auto" and back-off
    min_auto_step=0,
    auto_max_step=config_dict.placeholder(int),
    backoff=False,
    backoff_threshold=config_dict.placeholder(float),  # None: threshold
    backoff_factor=0.5,
    min_weight=0.0,
    recover_steps=1000,
    # Switch the memory off for good (no enqueue, no memory term) when a rule says it
    # hurts. True or "ratio": the probe's rank drift (share of nearest neighbours
    # changed over the smallest drift lag) exceeds guard_ratio x its last reading
    # before the start in guard_readings consecutive readings (insight/controller.py;
    # needs the drift monitor). "paired": at each evaluation of guard_metric's
    # evaluator after the start, the exact one-sided McNemar test of its per-query
    # hits@k against those of the last evaluation before the start
    # (xbm_jax.control.paired_guard) fires at guard_alpha / (the run's readings after the
    # start). False: no guard.
    guard=config_dict.FieldReference(False, field_type=object),
    guard_ratio=2.0,
    guard_readings=1,
    guard_metric="",  # "paired": e.g. "eval/val/recall@1" (evaluator and k)
    guard_alpha=0.01,  # "paired": the run's false-alarm rate
    # Drift correction of the stored entries: "moments" shifts and scales the
    # memory's rows each step so that their per-dimension mean and variance match
    # the batch's (Adaptive Cross Batch Normalization; xbm_jax.freshness.moments);
    # "none" is the reference. moments_ema in [0, 1): > 0 matches a moving average
    # of the batch moments with this decay (kept in the train state), 0 each
    # batch's own.
    drift_correction="none",
    moments_ema=0.0,
    # m in [0, 1): > 0 embeds the enqueued batch with a momentum encoder, an
    # exponential moving average of the parameters with this momentum (MoCo; its
    # own BatchNorm statistics; kept in the train state; one extra forward per
    # step). 0: the trained encoder's embeddings, as the reference.
    momentum_encoder=0.0,
    # Head re-projection: the memory stores the batch's pooled backbone features
    # (in xbm.dtype) instead of its embeddings, and each step embeds them with the
    # current head (xbm_jax.freshness.reprojection): exact for the head's share of the
    # drift. Costs size x feature_dim x itemsize bytes (ResNet-50: 2048 features)
    # and one [size, F] x [F, D] product per step.
    reprojection=False,
  )

  c.optim = dict(
    name="adam",
    lr=1e-4,
    weight_decay=5e-4,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    momentum=0.9,
    schedule="plateau",  # constant | step | cosine | plateau
    warmup_steps=0,
    decay_every=10_000,
    decay_factor=0.1,
    plateau=dict(metric="", factor=0.5, patience=4, threshold=1e-4, min_scale=1e-3),
  )

  c.train = dict(
    steps=35_000,
    num_devices=config_dict.placeholder(int),  # default: all visible devices
    log_every=50,
    checkpoint_every=1000,
    keep_checkpoints=2,
    best_metric="",  # e.g. "eval/sop/recall@1": also keep the best
    # Warm start: another run's workdir; its latest params and BN statistics
    # initialise this run (optimiser, memory and step start fresh).
    init_from=config_dict.placeholder(str),
    progress=True,
    # Resume even though the config differs from the saved one (in ways that
    # keep the state's shapes); the changes are logged.
    allow_config_change=False,
    # Gradient accumulation: each step's batch runs as this many micro-batches in
    # turn, one update (see step.make_train_step for what the memory sees).
    accumulate=1,
  )

  c.evals = (
    ml_collections.ConfigDict()
  )  # name -> dict(type=..., split=..., ks=..., every_steps=...)

  c.drift = dict(enabled=True, interval=500, deltas=(500, 1000), probe_size=256)
  c.pictures = dict(enabled=True, evaluator="", num_queries=6, top_k=5, seed=0)
  return c


def apply_smoke(c: ml_collections.ConfigDict, *, eval_ks=(1, 2)) -> ml_collections.ConfigDict:
  """The `:smoke` variant shared by the dataset configs: a tiny CNN, tiny images and
  batches, a few steps; checks the wiring, not the numbers."""
  c.model.name, c.model.embed_dim, c.model.width = "small_cnn", 32, 8
  c.input.transform = dict(resize=40, crop=32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=True)
  c.input.batch_size, c.input.samples_per_class = 16, 4
  c.input.eval_batch_size = 32
  c.xbm.size, c.xbm.start_step = 64, 2
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 6, 2, 3
  for ev in c.evals.values():
    ev.every_steps, ev.ks = 6, tuple(eval_ks)
  c.drift.interval, c.drift.deltas, c.drift.probe_size = 2, (2, 4), 16
  return c
