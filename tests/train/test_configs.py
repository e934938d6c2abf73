"""Every shipped config (and its :smoke variant) is valid: known keys, a batch the
sampler can build, evaluators that construct, a loss that accepts its options."""
import glob
import importlib.util
import os

import pytest

from xbm_jax.evaluation import evaluators
from xbm_jax.train import config as config_lib, setup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_config_is_valid(path, arg):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  assert "python scripts/train.py --config=configs/" in mod.__doc__
  c = mod.get_config(arg)
  setup.validate(c, num_devices=1)
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
  c.loss.kwargs.alpha = 2.0     # a multi-similarity option on the contrastive loss
  with pytest.raises(ValueError, match="loss.kwargs.alpha"):
    setup.validate(c, num_devices=1)
