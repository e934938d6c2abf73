"""`validation.validate`: each rule refuses its bad config with one line naming the
key, before the lock, the data or any file (the workdir stays absent, or as it was)."""

import os

import pytest

from tests.helpers.runs import tiny_config
from xbm_jax.train import config as config_lib, loop, validation
from xbm_jax.train.errors import ConfigError, DataError, UserError

QUICK = {"drift.enabled": False, "pictures.enabled": False}

# (overrides, a phrase of the error); the tiny config runs 8 devices, batch 16, K 4.
RULES = [
  ({"input.batch_size": 18}, "not divisible by config.input.samples_per_class"),
  ({"input.batch_size": 12, "input.samples_per_class": 3}, "not divisible by the 8"),
  ({"input.samples_per_class": 1, "input.batch_size": 8}, "samples_per_class=1"),
  ({"input.eval_batch_size": 12}, "eval_batch_size=12"),
  ({"input.worker_count": -2}, "worker_count=-2"),
  ({"train.accumulate": 2}, "micro-batches of whole classes"),  # 2 rows per device
  ({"train.accumulate": 0}, "accumulate=0"),
  ({"train.num_devices": 9}, "num_devices=9, but 8 devices"),
  ({"train.steps": 0}, "train.steps=0"),
  ({"train.log_every": 0}, "train.log_every=0"),
  ({"xbm.size": 8}, "smaller than the global batch"),
  ({"xbm.size": 68, "xbm.memory_sharding": "sharded"}, "divide by the 8 devices"),
  ({"xbm.memory_sharding": "striped"}, "memory_sharding"),
  ({"xbm.start_step": "soon"}, "start_step='soon'"),
  ({"xbm.weight": -1.0}, "xbm.weight=-1.0"),
  ({"xbm.enabled": False, "xbm.prefill": True}, "xbm.prefill=True needs the memory"),
  ({"xbm.enabled": False, "xbm.guard": True}, "xbm.guard=True needs the memory"),
  ({"xbm.start_step": "auto", "drift.enabled": False}, "start_step='auto' acts on drift"),
  ({"xbm.backoff": True, "drift.enabled": False}, "backoff acts on drift"),
  ({"xbm.guard": True, "drift.enabled": False}, "guard acts on drift"),
  ({"xbm.start_step": "auto", "xbm.threshold": None}, "needs config.xbm.threshold"),
  ({"xbm.backoff": True, "xbm.backoff_factor": 1.0}, "backoff_factor=1.0"),
  ({"xbm.guard": True, "xbm.guard_ratio": 1.0}, "guard_ratio=1.0"),
  ({"xbm.guard": True, "xbm.guard_readings": 0}, "guard_readings=0"),
  ({"xbm.guard": "sometimes"}, "xbm.guard='sometimes': False, True (= 'ratio') or 'paired'"),
  ({"xbm.guard": "paired"}, "config.xbm.guard_metric='': the paired guard reads"),
  (
    {"xbm.guard": "paired", "xbm.guard_metric": "eval/val/recall@1"},
    "guard_metric='eval/val/recall@1' names no evaluator",
  ),
  (
    {"xbm.guard": "paired", "xbm.guard_metric": "eval/sop/recall@1", "xbm.guard_alpha": 0.5},
    "guard_alpha=0.5 must be in (0, 0.5)",
  ),
  (
    {"xbm.guard": "paired", "xbm.guard_metric": "eval/sop/recall@1", "xbm.start_step": 0},
    "config.xbm.start_step=0 comes before the first one (step 6, config.evals.tiny.every_steps)",
  ),
  (
    {"xbm.guard": "paired", "xbm.guard_metric": "eval/sop/recall@1", "xbm.start_step": "auto"},
    "guard='paired' needs a fixed config.xbm.start_step",
  ),
  ({"xbm.enabled": False, "xbm.guard": "paired"}, "xbm.guard='paired' needs the memory"),
  ({"xbm.drift_correction": "kalman"}, "drift_correction='kalman' is not valid"),
  (
    {"xbm.memory_loss_kwargs.self_exclusion": "image"},
    "xbm.memory_loss_kwargs.self_exclusion='image' is not valid; choose one of similarity, "
    "index, id, none",
  ),
  ({"xbm.drift_correction": "moments", "xbm.moments_ema": 1.0}, "moments_ema=1.0: a decay"),
  ({"xbm.moments_ema": 0.9}, "moments_ema=0.9 smooths the moments"),
  (
    {"xbm.enabled": False, "xbm.drift_correction": "moments"},
    "drift_correction='moments' needs the memory",
  ),
  ({"xbm.momentum_encoder": 1.0}, "momentum_encoder=1.0: a decay in [0, 1)"),
  ({"xbm.enabled": False, "xbm.momentum_encoder": 0.5}, "momentum_encoder=0.5 needs the memory"),
  (
    {"train.num_devices": 1, "train.accumulate": 2, "xbm.momentum_encoder": 0.5},
    "needs config.train.accumulate=1 (got 2)",
  ),
  ({"xbm.enabled": False, "xbm.reprojection": True}, "reprojection=True needs the memory"),
  (
    {"xbm.reprojection": True, "xbm.momentum_encoder": 0.5},
    "cannot be combined with config.xbm.momentum_encoder=0.5",
  ),
  (
    {"xbm.reprojection": True, "xbm.drift_correction": "moments"},
    "cannot be combined with config.xbm.drift_correction='moments'",
  ),
  (
    {"train.num_devices": 1, "train.accumulate": 2, "xbm.reprojection": True},
    "cannot be combined with config.train.accumulate=2",
  ),
  # The smoke config's first drift reading (lag 2) comes after update 2: a start at 1
  # leaves the guard nothing to compare with.
  ({"xbm.guard": True, "xbm.start_step": 1}, "start_step=1 comes before the first"),
  ({"drift.deltas": (3,)}, "3 is not a positive multiple of config.drift.interval=2"),
  ({"drift.deltas": ()}, "drift.deltas is empty"),
  ({"drift.probe_size": 1}, "probe_size=1"),
  ({"optim.schedule": "plateau", "optim.plateau.metric": ""}, "needs config.optim.plateau.metric"),
  ({"optim.schedule": "plateau", "optim.plateau.metric": "eval/x/recall@1"}, "names no evaluator"),
  ({"loss.kwargs.alpha": 2.0}, "loss.kwargs.alpha is not an option of the 'contrastive'"),
  ({"evals.sop.type": "knn"}, "leave_one_out, query_gallery, vehicleid"),
  ({"evals.sop.split": ""}, "evals.tiny.split is required"),
  ({"evals.sop.ks": ()}, "evals.tiny.ks=()"),
  ({"evals.sop.every_steps": 0}, "every_steps=0"),
  ({"evals.sop.split": "val"}, "no split 'val' in dataset 'tiny'; splits: ['test', 'train']"),
  ({"input.train_split": "trian"}, "config.input.train_split: no split 'trian'"),
  ({"pictures.evaluator": "other"}, "pictures.evaluator='other'"),
  # evals.sop is renamed after the dataset, which an evaluator already holds.
  (
    {"evals.tiny": {"type": "leave_one_out", "split": "test", "ks": (1,)}},
    "would give two evaluators one name",
  ),
]


@pytest.mark.parametrize("overrides,match", RULES, ids=[str(o) for o, _ in RULES])
def test_each_rule_refuses_its_config_before_anything_is_written(
  data_dir, tmp_path, overrides, match
):
  wd = tmp_path / "bad"
  with pytest.raises(ConfigError) as err:
    loop.train_and_evaluate(tiny_config(data_dir, **overrides), str(wd))
  msg = str(err.value)
  assert match in msg, msg
  assert "\n" not in msg
  assert not wd.exists()


def test_an_evaluator_key_of_another_type_and_a_missing_dataset(data_dir, tmp_path):
  c = tiny_config(data_dir)
  c.evals.sop.splt = "test"
  with pytest.raises(ConfigError, match=r"config.evals.tiny: unknown key\(s\) \['splt'\]"):
    loop.train_and_evaluate(c, str(tmp_path / "a"))
  with pytest.raises(DataError, match="no prepared dataset 'nope'"):
    loop.train_and_evaluate(tiny_config(data_dir, **{"input.dataset": "nope"}), str(tmp_path / "b"))
  for key, value in (
    ("train.init_from", str(tmp_path / "none.msgpack")),
    ("train.init_from", str(tmp_path)),
    ("model.init_from", str(tmp_path / "backbone.msgpack")),
  ):
    with pytest.raises(DataError, match=f"config.{key}="):
      loop.train_and_evaluate(tiny_config(data_dir, **{key: value}), str(tmp_path / "c"))
  assert not os.listdir(tmp_path)


def test_an_unknown_key_is_named(data_dir, tmp_path):
  c = tiny_config(data_dir)
  c.xbm.sise = 10
  with pytest.raises(KeyError, match="xbm.sise"):
    loop.train_and_evaluate(c, str(tmp_path / "typo"))
  assert not (tmp_path / "typo").exists()


def test_a_refused_config_leaves_an_existing_workdir_untouched(data_dir, tmp_path):
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / "notes.txt").write_text("mine")
  before = {p: os.stat(wd / p).st_mtime_ns for p in os.listdir(wd)}
  with pytest.raises(UserError):
    loop.train_and_evaluate(tiny_config(data_dir, **{"xbm.guard": True, **QUICK}), str(wd))
  assert {p: os.stat(wd / p).st_mtime_ns for p in os.listdir(wd)} == before


def test_the_callers_config_is_not_changed():
  """The trainer names evaluators on its own copy."""
  c = config_lib.base()
  c.optim.schedule = "constant"
  c.evals.glyphs = dict(type="leave_one_out", split="test", ks=(1,))
  c.input.dataset = "mine"
  before = c.to_json()
  with pytest.raises(DataError):  # no data_dir: after the config checks
    loop.train_and_evaluate(c, "/nonexistent/run")
  assert c.to_json() == before


def test_every_stock_default_passes():
  """The oracle for the rules' reach: base() itself, with an evaluator, is valid."""
  c = config_lib.base()
  c.evals.glyphs = dict(type="leave_one_out", split="test", ks=(1,))
  c.optim.plateau.metric = "eval/glyphs/recall@1"
  c.input.dataset = "glyphs"
  validation.validate(c, num_devices=8)
