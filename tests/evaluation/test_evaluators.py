"""Evaluators from config, protocols, extraction, and the top-k shortcut."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from tests.helpers.retrieval import assert_same, clustered, oracle
from xbm_jax.evaluation import blockwise, evaluators, extract, metrics


def split_fn(splits):
  calls = []

  def embed_split(name):
    calls.append(name)
    emb, labels = splits[name]
    return dict(emb=emb, labels=labels, index=np.arange(len(labels)))

  return embed_split, calls


def test_leave_one_out_evaluator_names_and_values():
  x, l = clustered(90, 8, 20, 0.8, seed=5)
  embed_split, calls = split_fn({"test": (x, l)})
  ev = evaluators.create(
    "sop", ConfigDict(dict(type="leave_one_out", split="test", ks=(1, 10), every_steps=100))
  )
  out = ev.run(embed_split)
  assert calls == ["test"]
  want = oracle(x, l, ks=(1, 10))
  assert_same({k.removeprefix("eval/sop/"): v for k, v in out.items()}, want)
  assert "eval/sop/recall@1" in out and "eval/sop/num_singleton_excluded" in out
  assert ev.split_names() == ["test"] and ev.picture_splits() == ("test", "test")
  assert ev.retrieval_splits() == ("test", "test")


@pytest.mark.slow
def test_query_gallery_and_vehicleid_evaluators():
  q, ql = clustered(40, 8, 12, 0.8, seed=6)
  g, gl = clustered(70, 8, 12, 0.8, seed=7)
  embed_split, _ = split_fn({"query": (q, ql), "gallery": (g, gl), "a": (q, ql), "b": (g, gl)})
  ev = evaluators.create(
    "inshop",
    dict(
      type="query_gallery", query_split="query", gallery_split="gallery", ks=(1, 20), map_at_r=False
    ),
  )
  out = ev.run(embed_split)
  want = oracle(q, ql, g, gl, ks=(1, 20), self_exclude=False)
  assert out["eval/inshop/recall@20"] == pytest.approx(want["recall@20"])
  assert "eval/inshop/map@r" not in out
  assert ev.retrieval_splits() == ev.picture_splits() == ("query", "gallery")
  ev = evaluators.create(
    "vid", dict(type="vehicleid", ks=(1, 5), splits=dict(small="a", large="b"))
  )
  out = ev.run(embed_split)
  assert out["eval/vid/small/recall@5"] == pytest.approx(oracle(q, ql, ks=(5,))["recall@5"])
  assert out["eval/vid/large/map@r"] == pytest.approx(oracle(g, gl, ks=(5,))["map@r"])
  # Three test sets, no one gallery: no chance level for the collapse warning.
  assert ev.retrieval_splits() is None and ev.picture_splits() == ("a", "a")


def test_vehicleid_without_splits_uses_the_three_test_sets():
  """Its pictures come from its first test set (an evaluator config without `splits`
  used to raise KeyError in the pictures on process 0 alone)."""
  ev = evaluators.create("vid", dict(type="vehicleid", ks=(1,)))
  assert ev.split_names() == ["test_800", "test_1600", "test_2400"]
  assert ev.picture_splits() == ("test_800", "test_800")


def test_extract_drops_padding_and_keeps_index():
  embed_fn = jax.jit(lambda im: jnp.mean(im.astype(jnp.float32), axis=(1, 2)))
  images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)

  def batches():
    for s in (0, 8):
      im = np.zeros((8, 2, 2, 3), np.uint8)
      part = images[s : s + 8]
      im[: len(part)] = part
      mask = np.arange(8) < len(part)
      yield {
        "image": im,
        "label": np.arange(s, s + 8) % 3,
        "mask": mask,
        "index": np.arange(s, s + 8) + 100,
      }

  out = extract.extract(embed_fn, batches())
  np.testing.assert_allclose(out["emb"], images.astype(np.float32).mean(axis=(1, 2)))
  np.testing.assert_array_equal(out["labels"], np.arange(10) % 3)
  np.testing.assert_array_equal(out["index"], np.arange(10) + 100)
  assert out["emb"].dtype == np.float32 and out["labels"].dtype == np.int64


def test_extract_fallback_index_counts_the_whole_split_across_processes(monkeypatch):
  """Batches without `index`: after the processes' parts are gathered, each record's
  index is its position in the whole split (it used to restart in every part). Two
  processes are played by a gather that appends a second part of 3 records."""
  second = dict(emb=np.ones((3, 1), np.float32), labels=np.array([7, 8, 9]))
  monkeypatch.setattr(
    extract,
    "gather_processes",
    lambda parts: {k: np.concatenate([parts[k], second[k]]) for k in parts},
  )
  batch = {
    "image": np.zeros((4, 1, 1, 1), np.uint8),
    "label": np.array([1, 2, 3, 4]),
    "mask": np.array([1, 1, 1, 0], bool),
  }
  out = extract.extract(lambda x: np.zeros((len(x), 1), np.float32), [batch], prefetch=0)
  np.testing.assert_array_equal(out["labels"], [1, 2, 3, 7, 8, 9])
  np.testing.assert_array_equal(out["index"], np.arange(6))


def test_top_k_by_runs_equals_lax_top_k_with_ties():
  rng = np.random.default_rng(8)
  s = jnp.asarray(rng.integers(0, 6, (5, 32 * 40)).astype(np.float32))  # many ties
  for k in (1, 3, 9):
    v, i = blockwise.top_k_by_runs(s, k)
    wv, wi = jax.lax.top_k(s, k)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(wv))
    np.testing.assert_array_equal(np.asarray(i), np.asarray(wi))


def test_map_at_r_with_many_runs_matches_oracle():
  # Gallery large enough (> 4 * k runs of 32) to take the run-maxima path of top-R.
  q, ql = clustered(30, 6, 400, 1.2, seed=9)
  g, gl = clustered(4000, 6, 400, 1.2, seed=10)  # 125 runs of 32, max R ~ 20
  got = metrics.retrieval_metrics(q, ql, g, gl, ks=(1, 100), self_exclude=False)
  assert_same(got, oracle(q, ql, g, gl, ks=(1, 100), self_exclude=False))
