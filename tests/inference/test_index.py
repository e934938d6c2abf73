"""Index: save/load round trip and checks; exact search against a NumPy brute force."""

import os

import numpy as np
import pytest

from xbm_jax.inference import search as search_lib
from xbm_jax.inference.index import Index, IndexError_
from tests.helpers.sets import unit


def brute_top_k(q, g, k):
  """The oracle: float64 scores, stable argsort (ties by smaller index)."""
  s = q.astype(np.float64) @ g.astype(np.float64).T
  order = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, order, 1), order


def test_exact_search_is_the_brute_force_top_k_sharded_over_8_devices():
  rng = np.random.default_rng(0)
  g, q = unit(rng, 1000, 16), unit(rng, 37, 16)  # 1000: padding on every device
  index = Index(16).add(g[:400]).add(g[400:])
  scores, rows = index.search(q, 10)
  want_s, want_rows = brute_top_k(q, g, 10)
  np.testing.assert_allclose(scores, want_s, atol=1e-6)
  # Random unit vectors: no two scores of a query within float32 noise of each other.
  np.testing.assert_array_equal(rows, want_rows)


def test_ties_go_to_the_smaller_index_across_device_shards():
  # Dyadic vectors: every score is exact in float32, so ties are real ties.
  rng = np.random.default_rng(1)
  g = rng.integers(-2, 3, size=(300, 4)).astype(np.float32) / 4
  q = rng.integers(-2, 3, size=(20, 4)).astype(np.float32) / 4
  scores, rows = Index(4).add(g).search(q, 25)
  s = q @ g.T
  want = np.argsort(-s, axis=1, kind="stable")[:, :25]
  assert len(np.unique(s[0])) < 100  # many ties indeed
  np.testing.assert_array_equal(rows, want)
  np.testing.assert_array_equal(scores, np.take_along_axis(s, want, 1))


def test_k_above_the_gallery_size_returns_the_whole_gallery_ranked():
  rng = np.random.default_rng(2)
  g, q = unit(rng, 5, 8), unit(rng, 3, 8)
  scores, rows = Index(8).add(g).search(q, 50)
  assert rows.shape == (3, 5)
  np.testing.assert_array_equal(rows, brute_top_k(q, g, 5)[1])


def test_save_load_round_trip_keeps_every_field(tmp_path):
  rng = np.random.default_rng(3)
  index = Index(8)
  index.add(unit(rng, 4, 8), ids=[10, 11, 12, 13], labels=[1, 1, 2, 2], paths=["a", "b", "cc", "d"])
  index.add(unit(rng, 2, 8), ids=[20, 21], labels=[3, 3], paths=["a/longer/path.jpg", "e"])
  path = str(tmp_path / "g.npz")
  index.save(path)
  back = Index.load(path, dim=8)
  np.testing.assert_array_equal(back.emb, index.emb)
  np.testing.assert_array_equal(back.ids, [10, 11, 12, 13, 20, 21])
  np.testing.assert_array_equal(back.labels, [1, 1, 2, 2, 3, 3])
  assert list(back.paths) == ["a", "b", "cc", "d", "a/longer/path.jpg", "e"]
  assert back.labelled and back.dim == 8
  assert [f for f in os.listdir(tmp_path) if f != "g.npz"] == []  # no temporary left


def test_unlabelled_rows_make_an_unlabelled_index(tmp_path):
  index = Index(2).add(np.eye(2, dtype=np.float32))
  index.save(str(tmp_path / "u.npz"))
  back = Index.load(str(tmp_path / "u.npz"))
  assert not back.labelled and list(back.labels) == [-1, -1] and list(back.ids) == [0, 1]


def test_bad_rows_and_files_are_refused_naming_the_problem(tmp_path):
  index = Index(4)
  with pytest.raises(IndexError_, match=r"shape \(3, 5\).*dim 4"):
    index.add(np.zeros((3, 5), np.float32))
  with pytest.raises(IndexError_, match="NaN/inf"):
    index.add(np.full((2, 4), np.nan, np.float32))
  with pytest.raises(IndexError_, match="labels of shape"):
    index.add(np.zeros((2, 4), np.float32), labels=[1])
  with pytest.raises(IndexError_, match="empty index"):
    index.save(str(tmp_path / "e.npz"))
  assert not os.path.exists(tmp_path / "e.npz")
  Index(4).add(np.ones((2, 4), np.float32)).save(str(tmp_path / "four.npz"))
  with pytest.raises(IndexError_, match="4-d embeddings; the model makes 8-d"):
    Index.load(str(tmp_path / "four.npz"), dim=8)
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(IndexError_, match="junk.npz is not a readable index"):
    Index.load(str(tmp_path / "junk.npz"))
  np.savez(tmp_path / "other.npz", x=np.zeros(3))
  with pytest.raises(IndexError_, match="not an index file"):
    Index.load(str(tmp_path / "other.npz"))
  with pytest.raises(IndexError_, match="queries of shape"):
    Index.load(str(tmp_path / "four.npz")).search(np.zeros((1, 3)), 1)


def test_a_failed_save_leaves_the_old_file_whole(tmp_path, monkeypatch):
  path = str(tmp_path / "g.npz")
  Index(2).add(np.eye(2, dtype=np.float32)).save(path)
  before = open(path, "rb").read()
  from xbm_jax.inference import index as index_lib

  def boom(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(index_lib, "_write_stream", boom)
  with pytest.raises(OSError, match="disk full"):
    Index(2).add(np.ones((3, 2), np.float32)).save(path)
  assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["g.npz"]


@pytest.mark.skipif(not search_lib.faiss_available(), reason="faiss is not installed")
def test_faiss_backend_gives_the_exact_backend_s_neighbours():
  rng = np.random.default_rng(4)
  g, q = unit(rng, 2000, 32), unit(rng, 50, 32)
  index = Index(32).add(g)
  s1, r1 = index.search(q, 10)
  s2, r2 = index.search(q, 10, backend="faiss")
  np.testing.assert_allclose(s1, s2, atol=1e-5)
  np.testing.assert_array_equal(r1, r2)
