"""The embedder against evaluation's own path and the plain Flax forward."""

import numpy as np
import pytest

from xbm_jax.data import pipeline
from xbm_jax.evaluation.extract import extract
from xbm_jax.inference import sources
from xbm_jax.inference.embedder import Embedder
from xbm_jax.train import checkpoint, setup
from xbm_jax.train.errors import ConfigError, DataError
from tests.helpers.inference import flax_forward

pytestmark = pytest.mark.slow  # the shared 6-step training


def test_a_list_file_embeds_as_evaluation_embeds_the_prepared_split(tiny_run):
  e = Embedder.load(tiny_run["workdir"])
  src = setup.load_source(e.config.input, "test")
  batches = pipeline.eval_batches(src, batch_size=16, transform_cfg=e.tcfg)  # evaluation's
  want = extract(e.embed_fn, batches)
  got = e.embed_source(sources.list_file(tiny_run["list_file"]))
  np.testing.assert_array_equal(got["emb"], want["emb"])  # same bits: the same path
  np.testing.assert_array_equal(got["labels"], want["labels"])
  assert e.mesh.size == 8 and e.dim == 8


def test_embeddings_are_the_flax_forward_in_parts_and_whole(tiny_run):
  images = [im for _, im, _ in tiny_run["images"]]
  want = flax_forward(tiny_run["workdir"], images)
  e = Embedder.load(tiny_run["workdir"])
  np.testing.assert_allclose(e.embed_images(images), want, atol=2e-6)
  parts = list(e.embed_parts(sources.list_file(tiny_run["list_file"]), part_rows=16))
  assert [len(p["emb"]) for p in parts] == [16, 14]
  np.testing.assert_array_equal(np.concatenate([p["index"] for p in parts]), np.arange(30))
  np.testing.assert_allclose(np.concatenate([p["emb"] for p in parts]), want, atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(want, axis=1), 1, atol=1e-6)


def test_an_exported_params_file_embeds_as_its_workdir(tiny_run, tmp_path):
  out = str(tmp_path / "p.msgpack")
  checkpoint.export_params(tiny_run["workdir"], out)
  images = [im for _, im, _ in tiny_run["images"][:5]]
  a = Embedder.load(out, config=tiny_run["workdir"]).embed_images(images)
  np.testing.assert_array_equal(a, Embedder.load(tiny_run["workdir"]).embed_images(images))


def test_mistakes_are_named(tiny_run, tmp_path):
  with pytest.raises(DataError, match="has no checkpoint"):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    Embedder.load(str(tmp_path / "empty"))
  with pytest.raises(DataError, match="also pass --config"):
    Embedder.load(str(tmp_path / "x.msgpack"))
  e = Embedder.load(tiny_run["workdir"])
  cfg = e.config
  cfg.model.embed_dim = 16
  _, variables = checkpoint.read_params(tiny_run["workdir"])
  with pytest.raises(
    ConfigError, match=r"\['head'\]\['fc'\]\['bias'\] is \(8,\), this model's \(16,\)"
  ):
    Embedder(cfg, variables)
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not a png")
  with pytest.raises(DataError, match="unreadable image .*bad.png"):
    e.embed_source(sources.FileSource([str(bad)]))
