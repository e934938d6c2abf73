"""Exact ranking over float32 products: the error bound, and queries whose order a float32
score cannot settle (near-ties built to defeat it) against the float64 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.retrieval import KS, assert_same, mesh8, oracle
from xbm_jax.evaluation import metrics, rerank

TINY = 2.0**-30  # 0.5 + TINY rounds to 0.5 in float32 (half an ulp of 0.5 is 2^-25)


def test_near_tie_flips_recall_at_1():
  # Query 0 (label 0): negative 1 scores 0.5, positive 2 scores 0.5 + 2^-30. In float32
  # both are 0.5 and the tie goes to the smaller index (a miss); exactly, the positive
  # is first (a hit). Query 2 (label 0): positive 0 scores 0.5 + 2^-30 > 0.25: a hit.
  # Query 1 (label 1) is a singleton.
  x = np.array([[1, 1, 0], [0.5, 0, 0], [0.5, TINY, 0]], np.float32)
  l = np.array([0, 1, 0])
  assert np.float32(0.5) + np.float32(TINY) == np.float32(0.5)
  got = metrics.retrieval_metrics(x, l, ks=(1,), self_exclude=True, per_query=True)
  assert list(got["rank"]) == [0, -1, 0]
  assert got["recall@1"] == 1.0 and got["map@r"] == 1.0
  assert got["num_reranked_float64"] == 1  # query 0 only: query 2's order is clear


def test_near_tie_flips_map_at_r():
  # Query (label 0, R = 2): negative A = 0.5, positive B = 0.5 + 2^-30, positive C = 0.25.
  # float32 order A, B, C: top-2 [neg, pos], AP = 0.25; exact order B, A, C: AP = 0.5.
  q = np.array([[1, 1, 0]], np.float32)
  g = np.array([[0.5, 0, 0], [0.5, TINY, 0], [0.25, 0, 0]], np.float32)
  got = metrics.retrieval_metrics(q, [0], g, np.array([1, 0, 0]), ks=(1,), self_exclude=False)
  assert got["map@r"] == 0.5 and got["r_precision"] == 0.5 and got["recall@1"] == 1.0


def test_near_tie_between_two_negatives_needs_no_float64():
  # Negatives A = 0.5 and B = 0.5 + 2^-30 tie in float32 and swap in float64: no metric
  # changes (both rank before the positive C = 0.25), so the query is not re-ranked.
  q = np.array([[1, 1, 0]], np.float32)
  g = np.array([[0.5, 0, 0], [0.5, TINY, 0], [0.25, 0, 0]], np.float32)
  gl = np.array([1, 2, 0])
  got = metrics.retrieval_metrics(q, [0], g, gl, ks=(1, 3), self_exclude=False, per_query=True)
  assert got["num_reranked_float64"] == 0 and list(got["rank"]) == [2]
  want = oracle(q, np.array([0]), g, gl, ks=(1, 3), self_exclude=False)
  assert_same({k: v for k, v in got.items() if k in want}, want)
  assert want["recall@3"] == 1.0 and want["map@r"] == 0.0


def near_ties(n, seed):
  """Entries in {-2..2}/4 (scores on a 1/16 grid) and a last coordinate that is 1/2 in
  half the rows and m 2^-27 (m in -2..2) in the others: between the two kinds a score is
  a grid value plus m 2^-28, which float32 rounds away wherever |score| >= 1/4 (half an
  ulp there is 2^-26) and float64 keeps. So float32 ties what float64 orders."""
  rng = np.random.default_rng(seed)
  base = rng.integers(-2, 3, (n, 3)) / 4
  last = np.where(rng.random(n) < 0.5, 0.5, rng.integers(-2, 3, n) * 2.0**-27)
  x = np.concatenate([base, last[:, None]], axis=1).astype(np.float32)
  return x, rng.integers(0, 12, n)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_near_ties_built_to_defeat_float32_match_the_float64_oracle(seed):
  x, l = near_ties(160, seed)
  want = oracle(x, l, ks=KS)
  # The data does defeat float32: ranking by float32 scores answers differently.
  s32 = (x @ x.T).astype(np.float32).astype(np.float64)
  assert (s32 != x.astype(np.float64) @ x.astype(np.float64).T).any()
  got = metrics.retrieval_metrics(x, l, ks=KS, self_exclude=True, block_size=48, per_query=True)
  assert got["num_reranked_float64"] > 0
  got = {k: v for k, v in got.items() if k in want}
  assert_same(got, want)
  eight = metrics.retrieval_metrics(x, l, ks=KS, self_exclude=True, block_size=48, mesh=mesh8())
  assert_same(eight, want)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
@pytest.mark.parametrize("d", [5, 128])
def test_tolerance_bounds_the_device_product_error(scale, d):
  rng = np.random.default_rng(d)
  q = (rng.standard_normal((64, d)) * scale).astype(np.float32)
  g = (rng.standard_normal((300, d)) * scale).astype(np.float32)
  g[:40, : d // 2] = g[:40, d - d // 2 - 1 : d - 1] * 1000  # large terms that cancel
  q[:, : d // 2] = q[:, d - d // 2 - 1 : d - 1]
  g[:40, d - d // 2 - 1 : d - 1] *= -1
  s32 = np.asarray(
    jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision="highest"))(
      jnp.asarray(q), jnp.asarray(g)
    )
  )
  err = np.abs(s32.astype(np.float64) - q.astype(np.float64) @ g.astype(np.float64).T)
  tol = rerank.score_tolerance(q, g)
  assert (err <= tol[:, None] / 2).all()
  assert (tol < 1e-4 * scale**2 * np.sqrt(d) * 1000 * d).all()  # and not vacuous
