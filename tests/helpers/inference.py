"""The Flax forward of a trained run, the oracle of the embedder and export tests."""

import numpy as np
from xbm_jax import models
from xbm_jax.data import transforms
from xbm_jax.inference.embedder import Embedder
from xbm_jax.train import checkpoint


def flax_forward(workdir, images):
  """Oracle: the module built from config.json, one device, no sharding, eval mode."""
  e = Embedder.load(workdir)
  model = models.create(e.config.model)
  tcfg = transforms.TransformConfig.from_config(e.config.input.transform)
  x = np.stack([transforms.eval_transform(im, tcfg) for im in images])
  _, variables = checkpoint.read_params(workdir)
  return np.asarray(model.apply(variables, x, train=False))
