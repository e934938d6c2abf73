"""The committed pretrained glyph encoder loads into the fine-tuning model and embeds.

Uses the warm-start path the trainer uses (`config.train.init_from` ->
`checkpoint.warm_start`) on the real model shape, forward only (no training).
"""

import os

import flax
import jax
import numpy as np

from xbm_jax import models
from xbm_jax.configs import glyphs as glyph_config
from xbm_jax.data import glyphs, transforms
from xbm_jax.train import checkpoint
import pytest


@flax.struct.dataclass
class _State:
  params: dict
  batch_stats: dict


def _embed(model, variables, images):
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))


@pytest.mark.slow
def test_pretrained_weights_load_and_embed_glyphs():
  c = glyph_config.get_config("study,pretrained,smoke")
  assert (c.model.width, c.model.embed_dim) == (32, 64)  # the weights fix the shape
  assert os.path.isfile(c.train.init_from)
  model = models.create(c.model)
  fresh = models.init_variables(
    model, jax.random.key(0), image_size=c.input.transform.crop, channels=1
  )
  state = checkpoint.warm_start(_State(fresh["params"], fresh["batch_stats"]), c.train.init_from)
  loaded = {"params": state.params, "batch_stats": state.batch_stats}

  a = glyphs.load_arrays("test")
  classes = np.unique(a["labels"])[:12]
  rows = np.flatnonzero(np.isin(a["labels"], classes))
  tcfg = transforms.TransformConfig.from_config(c.input.transform.to_dict())
  images = np.stack([transforms.eval_transform(im, tcfg) for im in a["images"][rows]])
  emb, emb_fresh = _embed(model, loaded, images), _embed(model, fresh, images)
  assert emb.shape == (len(rows), 64) and np.isfinite(emb).all()
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  assert np.abs(emb - emb_fresh).max() > 0.1

  # Unseen classes: the pretrained encoder puts a character's typefaces closer together
  # than other characters' (margin well above a random init's).
  def gap(e):
    sim = e @ e.T
    same = a["labels"][rows][:, None] == a["labels"][rows][None, :]
    off = ~np.eye(len(rows), dtype=bool)
    return sim[same & off].mean() - sim[~same].mean()

  assert gap(emb) > 0.2 and gap(emb) > gap(emb_fresh) + 0.1
