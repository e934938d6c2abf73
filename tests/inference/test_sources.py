"""Image sources and the input channels of an untrained model (no training needed)."""

import jax
import numpy as np
import pytest
from PIL import Image

from xbm_jax import models, parallel
from xbm_jax.data import transforms
from xbm_jax.inference import sources
from xbm_jax.inference.embedder import Embedder
from xbm_jax.train import config as config_lib
from xbm_jax.train.errors import DataError


def untrained(channels):
  cfg = config_lib.base()
  cfg.model.name, cfg.model.embed_dim, cfg.model.width = "small_cnn", 4, 4
  cfg.input.transform.resize, cfg.input.transform.crop = 12, 8
  cfg.input.eval_batch_size = 4
  model = models.create(cfg.model, axis_name=parallel.DATA_AXIS)
  v = models.init_variables(model, jax.random.key(0), image_size=8, channels=channels)
  return cfg, jax.tree.map(np.asarray, v)


def test_a_grayscale_model_reads_files_as_gray_and_embeds_as_its_forward(tmp_path):
  cfg, variables = untrained(1)
  e = Embedder(cfg, variables)
  assert e.channels == 1 and e.batch_size == 8  # rounded up to the 8 devices
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
  src = sources.folder(str(tmp_path), channels=1)
  assert list(src.paths) == ["0.png", "1.png", "2.png"] and not src.labelled
  got = e.embed_source(src)["emb"]
  gray = [np.asarray(Image.open(tmp_path / f"{i}.png").convert("L"))[..., None] for i in range(3)]
  x = np.stack([transforms.eval_transform(g, e.tcfg) for g in gray])
  want = models.create(cfg.model).apply(variables, x, train=False)
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_missing_and_empty_inputs_are_named(tmp_path):
  with pytest.raises(DataError, match=r"unreadable image .*nope.jpg: no such file"):
    sources.FileSource([str(tmp_path / "nope.jpg")])
  with pytest.raises(DataError, match="holds no images"):
    sources.folder(str(tmp_path))
  (tmp_path / "l.txt").write_text("a.png\n")
  with pytest.raises(DataError, match=r"l.txt:1: expected 2 fields"):
    sources.list_file(str(tmp_path / "l.txt"))
