"""Retrieval metrics against a brute-force NumPy oracle and hand-computed values."""

import jax
import numpy as np
import pytest

from xbm_jax.evaluation import blockwise, metrics, rerank
from tests.helpers.retrieval import KS, assert_same, clustered, mesh8, oracle


def test_random_leave_one_out_matches_oracle_with_ragged_blocks():
  x, l = clustered(203, 16, 40, 1.0, seed=0)  # 203 = 3 * 64 + 11: blocks do not divide N
  got = metrics.retrieval_metrics(x, l, ks=KS, self_exclude=True, block_size=64)
  assert_same(got, oracle(x, l, ks=KS))
  assert got["recall@500"] == 1.0  # K beyond N: every scored query hits


def test_random_query_gallery_with_labels_missing_from_gallery():
  q, ql = clustered(97, 8, 30, 0.8, seed=1)
  g, gl = clustered(150, 8, 30, 0.8, seed=2)
  ql = ql.copy()
  ql[:9] = 10_000  # never in the gallery: excluded and counted
  got = metrics.retrieval_metrics(q, ql, g, gl, ks=KS, self_exclude=False, block_size=40)
  want = oracle(q, ql, g, gl, ks=KS, self_exclude=False)
  assert_same(got, want)
  assert got["num_singleton_excluded"] >= 9


def tie_set():
  """Exactly representable scores: ties are real ties in float32 and float64."""
  x = np.array([[1, 0], [0.5, 0], [0.5, 0], [0.5, 0], [0, 1], [0, 1], [0, 0.5], [1, 0]], np.float32)
  l = np.array([0, 1, 0, 2, 3, 4, 3, 1])
  return x, l


@pytest.mark.slow
def test_hand_made_ties_break_by_gallery_index():
  x, l = tie_set()
  got = metrics.retrieval_metrics(x, l, ks=(1, 2), self_exclude=True, block_size=3)
  # Query 0 (label 0): item 7 (label 1) scores 1.0 > its positive 2 (0.5), and negative 1
  # ties the positive at 0.5 with a smaller index -> rank 2: miss at 1 and 2.
  # Query 1 (label 1): positive 7 scores 0.5, tied with item 0 (smaller index) -> rank 1.
  # Query 2 (label 0): positive 0 scores 0.5, tied with item 7 (larger index) -> rank 0.
  # Query 4 (label 3): item 5 scores 1.0 before positive 6 (0.5) -> rank 1.
  # Query 6 (label 3): positive 4 scores 0.5, tied with 5 (larger index) -> rank 0.
  # Query 7 (label 1): item 0 scores 1.0 before positive 1 (0.5) -> rank 1.
  # Queries 3 (label 2) and 5 (label 4) are singletons.
  assert got["num_singleton_excluded"] == 2
  assert got["num_queries"] == 6
  assert got["recall@1"] == pytest.approx(2 / 6)  # queries 2 and 6
  assert got["recall@2"] == pytest.approx(5 / 6)  # all but query 0
  assert_same(got, oracle(x, l, ks=(1, 2)))


def test_positive_before_tied_negative_hits():
  # Swapping which of two tied items has the lower index flips the outcome.
  x = np.array([[1, 0], [0.5, 0], [0.5, 0]], np.float32)
  hit = metrics.recall_at_k(x, np.array([0, 0, 1]), ks=(1,), self_exclude=True)
  miss = metrics.recall_at_k(x, np.array([0, 1, 0]), ks=(1,), self_exclude=True)
  # Query 0: positive at index 1 vs tied negative at 2 -> hit; swapped -> miss.
  # The other queries: query 1 (label 0) top is item 0 (0.5 > 0.25) -> hit; query 2
  # (label 1) is a singleton in the first set; in the second, query 2 (label 0) hits.
  assert hit["recall@1"] == 1.0 and hit["num_queries"] == 2
  assert miss["recall@1"] == pytest.approx(1 / 2) and miss["num_queries"] == 2


def test_self_excluded_by_index_not_by_rank_zero():
  # Items 0 and 1 are identical; 1 is the query. Dropping "rank 0" would drop item 0
  # (a negative with the same score and a smaller index) and keep self: a false hit.
  x = np.array([[1, 0], [1, 0], [0.5, 0]], np.float32)
  l = np.array([5, 0, 0])
  loo = metrics.retrieval_metrics(x, l, ks=(1, 2), self_exclude=True)
  # Query 1: item 0 (negative, 1.0) before item 2 (positive, 0.5): rank 1.
  # Query 2: item 0 (1*.5 = .5, negative, index 0) ties item 1 (positive) -> rank 1.
  assert loo["recall@1"] == 0.0 and loo["recall@2"] == 1.0
  assert loo["num_singleton_excluded"] == 1
  assert_same(loo, oracle(x, l, ks=(1, 2)))


def test_singletons_are_excluded_and_counted():
  x, l = clustered(60, 4, 10, 0.5, seed=3)
  l = l.copy()
  l[[0, 5, 9]] = [1001, 1002, 1003]
  got = metrics.retrieval_metrics(x, l, ks=(1, 4), self_exclude=True)
  want = oracle(x, l, ks=(1, 4))
  assert_same(got, want)
  assert got["num_singleton_excluded"] >= 3
  assert got["num_queries"] + got["num_singleton_excluded"] == 60


def test_map_at_r_hand_computed():
  # Query 0 (label 0, R = 2): ranking 1 (pos), 2 (neg), 3 (pos) -> top-2 = [pos, neg]:
  # MAP@R = (1/1) / 2 = 0.5, R-precision = 1/2.
  x = np.array([[1, 0, 0], [0.75, 0.5, 0], [0.5, 0, 0], [0.25, 0, 0]], np.float32)
  l = np.array([0, 0, 1, 0])
  got = metrics.map_at_r(x[:1], l[:1], x[1:], l[1:], self_exclude=False)
  assert got["map@r"] == pytest.approx(0.5)
  assert got["r_precision"] == pytest.approx(0.5)
  assert got["precision@1"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("self_exclude", [True, False])
def test_eight_devices_equal_one(self_exclude):
  assert jax.device_count() >= 8
  x, l = clustered(203, 8, 30, 1.0, seed=4)  # 203 gallery rows: padded on 8 shards
  tx, tl = tie_set()
  tx = np.pad(tx, ((0, 0), (0, x.shape[1] - tx.shape[1])))
  x = np.concatenate([x, tx]).astype(np.float32)
  l = np.concatenate([l, tl + 100_000])
  if self_exclude:
    args = (x, l)
  else:
    args = (x[:77], l[:77], x[50:], l[50:])
  one = metrics.retrieval_metrics(*args, ks=KS, self_exclude=self_exclude, block_size=48)
  eight = metrics.retrieval_metrics(
    *args, ks=KS, self_exclude=self_exclude, block_size=48, mesh=mesh8()
  )
  assert one == eight
  assert_same(eight, oracle(*args, ks=KS, self_exclude=self_exclude))
  if self_exclude:  # a 2-D mesh: the gallery is sharded over both axes
    two_d = metrics.retrieval_metrics(
      *args, ks=KS, self_exclude=True, block_size=48, mesh=jax.make_mesh((2, 4), ("data", "model"))
    )
    assert two_d == one


@pytest.mark.slow
def test_per_query_ranks_and_errors():
  x, l = tie_set()
  res = metrics.retrieval_metrics(x, l, ks=(1,), self_exclude=True, per_query=True)
  np.testing.assert_array_equal(res["rank"], [2, 1, 0, -1, 1, -1, 0, 1])
  with pytest.raises(ValueError, match="self_exclude"):
    metrics.retrieval_metrics(x, l, x[:3], l[:3], self_exclude=True)
  with pytest.raises(ValueError, match="query_labels"):
    metrics.retrieval_metrics(x, l[:3], self_exclude=True)
  with pytest.raises(ValueError, match="ks"):
    metrics.retrieval_metrics(x, l, ks=(0,), self_exclude=True)
  with pytest.raises(TypeError, match="labels"):
    metrics.retrieval_metrics(x, l.astype(np.float32), self_exclude=True)


def test_nan_scores_never_count_as_hits():
  """Finite embeddings whose positive score overflows to NaN (1e60 - 1e60 = inf - inf):
  a NaN best positive used to have "nothing ranked above it", rank 0, a hit. By hand:
  items 0 and 1 (class 0) score NaN with each other and 0 with class 1, so neither
  finds its positive; items 2 and 3 (class 1) score 1 with each other: hits."""
  e = np.array([[1e30, 1e30, 0], [1e30, -1e30, 0], [0, 0, 1], [0, 0, 1]], np.float32)
  labels = np.array([0, 0, 1, 1])
  res = metrics.retrieval_metrics(e, labels, ks=(1, 2), self_exclude=True, per_query=True)
  assert res["recall@1"] == res["recall@2"] == 0.5
  assert list(res["rank"][:2] >= 2) == [True, True] and list(res["rank"][2:]) == [0, 0]
  assert res["map@r"] == 0.5 and res["precision@1"] == 0.5


def test_overflowed_scores_never_count_as_hits():
  """A positive score that overflows to +inf (1e60 + 1e60: inf on every CPU, fused
  multiply-adds or not) is as meaningless as a NaN one: it ranks first and is never a hit,
  so a CPU whose fused dot turns the NaN case above into inf scores the same. By hand:
  items 0 and 1 (class 0) score inf with each other, items 2 and 3 score 1 (hits)."""
  e = np.array([[1e30, 1e30, 0], [1e30, 1e30, 0], [0, 0, 1], [0, 0, 1]], np.float32)
  labels = np.array([0, 0, 1, 1])
  res = metrics.retrieval_metrics(e, labels, ks=(1, 2), self_exclude=True, per_query=True)
  assert res["recall@1"] == res["recall@2"] == 0.5
  assert list(res["rank"][:2] >= 2) == [True, True] and list(res["rank"][2:]) == [0, 0]
  assert res["map@r"] == 0.5 and res["precision@1"] == 0.5


def test_non_finite_embeddings_are_refused():
  e = np.eye(4, dtype=np.float32)
  e[2, 1] = np.nan
  with pytest.raises(ValueError, match="query_emb has 1 of 4 rows with NaN/inf"):
    metrics.retrieval_metrics(e, np.array([0, 0, 1, 1]), self_exclude=True)
  g = np.eye(4, dtype=np.float32)
  g[0, 0] = np.inf
  with pytest.raises(ValueError, match="gallery_emb has 1 of 4"):
    metrics.retrieval_metrics(
      np.eye(4, dtype=np.float32), np.arange(4), g, np.arange(4), self_exclude=False
    )


def tie_heavy(n, d, classes, seed):
  """Entries in {-2..2}/4, d = 3: every score is one of the 25 multiples of 1/16 in
  [-3/4, 3/4], exact in float32 and float64, so almost every item ties with others."""
  rng = np.random.default_rng(seed)
  x = (rng.integers(-2, 3, (n, d)) / 4).astype(np.float32)
  return x, rng.integers(0, classes, n)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_tie_heavy_random_matches_oracle_on_one_and_eight_devices(seed):
  x, l = tie_heavy(150, 3, 25, seed)
  want = oracle(x, l, ks=KS)
  one = metrics.retrieval_metrics(x, l, ks=KS, self_exclude=True, block_size=32)
  assert_same(one, want)
  eight = metrics.retrieval_metrics(x, l, ks=KS, self_exclude=True, block_size=32, mesh=mesh8())
  assert eight == one


def test_block_bytes_bounds_the_score_block_and_keeps_results():
  # 203 gallery rows pad to 224 (whole runs of 32): 8 rows x 224 x 4 B = 7,168 B.
  assert blockwise.block_rows(1024, 203, 224, 7_168) == 8
  assert blockwise.block_rows(1024, 203, 224, 7_167) == 8  # never below 8 rows
  assert blockwise.block_rows(1024, 203, 224, 64 * 2**20) == 208  # all queries, padded to 8
  assert blockwise.block_rows(3, 203, 224, 64 * 2**20) == 3
  rows = blockwise.block_rows(1024, 60_502, 60_512, 64 * 2**20)
  assert rows * 60_512 * 4 <= 64 * 2**20 < (rows + 8) * 60_512 * 4
  x, l = clustered(203, 16, 40, 1.0, seed=5)
  small = metrics.retrieval_metrics(x, l, ks=KS, self_exclude=True, block_bytes=7_168)
  assert small == metrics.retrieval_metrics(x, l, ks=KS, self_exclude=True)
  assert_same(small, oracle(x, l, ks=KS))
  with pytest.raises(ValueError, match="block_bytes"):
    metrics.retrieval_metrics(x, l, self_exclude=True, block_bytes=0)


def test_nan_guard_is_skipped_only_when_scores_are_provably_finite():
  unit = np.eye(4, dtype=np.float32)
  assert rerank.scores_finite(unit, unit)
  big = np.full((2, 4), 1e18, np.float32)  # 4 * 1e18 * 1e18 = 4e36: still safe
  assert rerank.scores_finite(big, big)
  assert not rerank.scores_finite(big * 10, big)  # 4e37: may overflow, guarded
  assert not rerank.scores_finite(-big * 10, big)  # magnitude, not sign
  # Both compiled paths give the same outputs on finite data (ties and ragged padding).
  x, l = tie_heavy(70, 3, 12, seed=2)
  pos, npos = metrics._positive_lists(l, l, True)
  gx = np.zeros((96, 3), np.float32)
  gx[:70] = x
  gl = np.zeros(96, np.int32)
  gl[:70] = l
  tol = rerank.score_tolerance(x, x)
  args = (x, tol, np.arange(70, dtype=np.int32), pos, l.astype(np.int32), npos, gx, gl)
  mesh = blockwise.default_mesh()
  top_k = int(npos.max()) + 1
  guarded = blockwise.compiled_block(mesh, 70, top_k, True)(*args)
  plain = blockwise.compiled_block(mesh, 70, top_k, False)(*args)
  for a, b in zip(guarded, plain):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
