"""Every shipped config (and its :smoke variant) is valid: known keys, a batch the
sampler can build, evaluators that construct, a loss that accepts its options."""

import glob
import importlib.util
import os
import re

import numpy as np
import pytest

from xbm_jax.evaluation import evaluators
from xbm_jax.train import config as config_lib, setup, validation
from xbm_jax.train.errors import ConfigError


def prepare(c):
  """What the trainer does to a config before the run: the evaluators named after
  the dataset, then every check (no data here: the stock datasets are not prepared)."""
  setup.name_evaluators(c)
  validation.validate(c, num_devices=1, check_data=False)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_config_is_valid(path, arg):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  # The command in the docstring trains this very file (not a copied neighbour's).
  cmd = re.search(r"python scripts/train\.py --config=(configs/\w+\.py)", mod.__doc__)
  assert cmd and os.path.samefile(os.path.join(ROOT, cmd.group(1)), path)
  c = mod.get_config(arg)
  prepare(c)
  for name, ev in c.evals.items():
    evaluators.create(name, ev)
  if c.optim.schedule == "plateau":
    assert c.optim.plateau.metric.startswith("eval/")


def test_parse_arg_rejects_unknown_and_types_values():
  a = config_lib.parse_arg("smoke,seed=3", smoke=False, seed=0)
  assert a.smoke is True and a.seed == 3
  with pytest.raises(ValueError, match="unknown config argument"):
    config_lib.parse_arg("smok", smoke=False)


def test_loss_option_not_of_the_loss_is_an_error():
  c = config_lib.base()
  c.optim.schedule = "constant"
  c.loss.kwargs.alpha = 2.0  # a multi-similarity option on the contrastive loss
  with pytest.raises(ValueError, match="loss.kwargs.alpha"):
    prepare(c)


def _load(name, arg=None):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _metric_names(c):
  """What a run of `c` would log: the evaluators built from the validated config."""
  x = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
  data = dict(emb=x, labels=np.repeat(np.arange(4), 3), index=np.arange(12))
  out = {}
  for name, ev in c.evals.items():
    cfg = ev.to_dict()
    if cfg["type"] == "vehicleid":
      cfg["splits"] = {"small": "test_800"}
    out.update(evaluators.create(name, cfg).run(lambda split: data))
  return out


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_stock_configs_keep_their_metric_names(path):
  """READMEs and best_metric / plateau.metric name eval/<stock dataset>/..."""
  c = _load(os.path.basename(path))
  before = (list(c.evals), c.train.best_metric, c.optim.plateau.metric)
  prepare(c)
  assert (list(c.evals), c.train.best_metric, c.optim.plateau.metric) == before
  if os.path.basename(path) == "cjk.py":  # the study's testbed: evaluators named by split
    assert {n: ev.split for n, ev in c.evals.items()} == {"val": "val", "test": "test"}
  else:
    assert list(c.evals) == [c.input.dataset]


@pytest.mark.parametrize("name", ["glyphs.py", "sop.py", "vehicleid.py", "cars.py"])
def test_evaluator_names_follow_a_renamed_dataset(name):
  """--config.input.dataset=mine used to log eval/glyphs/* for the data of `mine`."""
  c = _load(name)
  stock = c.input.dataset
  c.input.dataset = "mine"
  c.pictures.evaluator = stock
  c.lock()  # as config_flags hands it over
  prepare(c)
  assert list(c.evals) == ["mine"]
  assert c.train.best_metric.startswith("eval/mine/")
  assert c.train.best_metric.removeprefix("eval/mine/") in ("recall@1", "small/recall@1")
  if c.optim.plateau.metric:
    assert c.optim.plateau.metric == c.train.best_metric
  assert c.pictures.evaluator == "mine"
  names = _metric_names(c)
  assert "eval/mine/recall@1" in names or "eval/mine/small/recall@1" in names
  assert not [n for n in names if n.startswith(f"eval/{stock}/")]
  prepare(c)  # idempotent (a resumed run validates again)
  assert list(c.evals) == ["mine"]


def test_study_keeps_val_and_test_on_a_renamed_dataset():
  c = _load("glyphs.py", "study")
  c.input.dataset = "mine"
  prepare(c)
  assert sorted(c.evals) == ["test", "val"]
  assert set(_metric_names(c)) >= {"eval/val/recall@1", "eval/test/recall@1"}


def test_alias_is_the_same_dataset_and_two_renames_are_an_error():
  c = _load("cars.py")
  c.input.dataset = "cars196"
  prepare(c)
  assert list(c.evals) == ["cars"]
  c = _load("glyphs.py")
  c.input.dataset = "sop"
  c.evals.mine = dict(c.evals.glyphs)
  c.evals.sop = dict(c.evals.glyphs)
  with pytest.raises(ConfigError, match="two evaluators one name"):
    prepare(c)


DOC_VARIANTS = sorted(
  {
    (os.path.basename(path), m.group(1))
    for path in CONFIGS
    for m in re.finditer(r"--config=configs/\w+\.py:([\w=.,]+)", open(path).read())
  }
)


@pytest.mark.parametrize("name,arg", DOC_VARIANTS, ids=lambda x: str(x))
def test_variants_named_in_docstrings_are_valid(name, arg):
  """A command a config's docstring prints (e.g. `configs/cjk.py:ms_xbm_momentum`) loads
  and passes every check."""
  prepare(_load(name, arg))
