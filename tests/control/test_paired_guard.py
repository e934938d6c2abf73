"""The paired memory guard against hand-computed binomial tails and simulated nulls.

Oracles: McNemar counts and exact binomial tails computed by hand (k of n
fair coin flips, as fractions of 2^n); the false-alarm rate of the rule on
readings simulated under "the memory changes nothing" (NumPy coin flips); the
normal quantile from a printed table; per-query hits of a hand-made retrieval
set. Cheap: NumPy and one tiny retrieval pass.
"""

import math

import numpy as np
import pytest

from xbm_jax.control import paired_guard as pg
from xbm_jax.evaluation import metrics


def _pair(gains, losses, both, neither):
  """Hits arrays with the given counts of each kind of query."""
  mem = [1] * gains + [0] * losses + [1] * both + [0] * neither
  ref = [0] * gains + [1] * losses + [1] * both + [0] * neither
  return np.array(mem, bool), np.array(ref, bool)


def test_a_hand_computed_reading():
  mem = np.array([1, 1, 0, 1, 0, 0, 1, 0, 1, 1], bool)
  ref = np.array([1, 1, 1, 1, 1, 0, 1, 1, 1, 1], bool)
  v = pg.verdict(mem, ref, alpha=0.05)
  # 3 losses, no gain: P(3 heads of 3) = 1/8, not below 0.05 (a normal z of -1.73 would be)
  assert (v.gains, v.losses, v.n_queries) == (0, 3, 10)
  assert v.p_value == pytest.approx(1 / 8, rel=1e-12)
  assert v.z == pytest.approx(-math.sqrt(3))
  assert v.difference == pytest.approx(-0.3)
  assert not v.switch_off


def test_gains_and_losses_against_the_binomial_tail_by_hand():
  mem, ref = _pair(gains=2, losses=9, both=30, neither=9)
  tail = (55 + 11 + 1) / 2**11  # C(11,9) + C(11,10) + C(11,11) of 2^11
  v = pg.verdict(mem.astype(int), ref.astype(float), alpha=0.05)  # 0/1 numbers are hits too
  assert v.p_value == pytest.approx(tail, rel=1e-12) and tail == pytest.approx(0.0327, abs=1e-4)
  assert v.switch_off and v.difference == pytest.approx(-7 / 50)
  assert v.z == pytest.approx(-7 / math.sqrt(11))
  assert not pg.verdict(mem, ref, alpha=0.01).switch_off
  # several readings: each is tested at alpha / looks
  assert not pg.verdict(mem, ref, alpha=0.05, looks=2).switch_off  # 0.0327 >= 0.025


def test_looks_split_the_false_alarm_rate():
  mem, ref = _pair(gains=0, losses=6, both=4, neither=0)  # p = 1/64 = 0.0156
  assert pg.verdict(mem, ref, alpha=0.05, looks=2).switch_off  # 0.0156 < 0.025
  assert not pg.verdict(mem, ref, alpha=0.05, looks=4).switch_off  # 0.0156 >= 0.0125


def test_no_difference_or_a_better_memory_never_switches_off():
  same = np.array([1, 0, 1, 1], bool)
  v = pg.verdict(same, same)
  assert (v.p_value, v.z, v.difference, v.switch_off) == (1.0, 0.0, 0.0, False)
  mem, ref = _pair(gains=40, losses=0, both=5, neither=5)
  assert not pg.verdict(mem, ref, alpha=0.4).switch_off  # one-sided: only harm counts


def test_false_alarm_rate_under_the_null_and_power_under_a_drop():
  rng = np.random.default_rng(0)
  q, trials, alpha = 400, 2000, 0.05

  def fire_rate(loss_share):
    fired = 0
    for _ in range(trials):
      differs = rng.random(q) < 0.2
      lost = rng.random(q) < loss_share
      agreed = rng.random(q) < 0.6  # the hits of the queries on which both agree
      ref = np.where(differs, lost, agreed)  # a differing query: a loss or a gain
      mem = np.where(differs, ~lost, agreed)
      fired += pg.verdict(mem, ref, alpha=alpha).switch_off
    return fired / trials

  null = fire_rate(0.5)
  assert 0.02 < null <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials), null
  assert fire_rate(0.7) > 0.9  # 40 % more losses than gains among ~80 differing queries


def test_detectable_drop_by_hand():
  z99 = 2.3263478740  # the normal 0.99 quantile (table)
  got = pg.detectable_drop(n_queries=2000, discordant_share=0.15, alpha=0.01)
  assert got == pytest.approx(z99 * math.sqrt(0.15 / 2000), rel=1e-9)
  assert round(got, 3) == 0.020  # the docstring's example
  z995 = 2.5758293035
  got = pg.detectable_drop(n_queries=500, discordant_share=0.3, alpha=0.01, looks=2)
  assert got == pytest.approx(z995 * math.sqrt(0.3 / 500), rel=1e-9)


def test_hits_from_the_evaluations_per_query_ranks():
  # Leave-one-out on 5 unit vectors: each query's nearest other point decides its hit.
  emb = np.array([[1, 0], [0.96, 0.28], [0, 1], [0.28, 0.96], [-1, 0]], np.float32)
  labels = np.array([0, 0, 1, 2, 1], np.int32)  # query 3's class has no other member
  res = metrics.retrieval_metrics(emb, labels, ks=(1,), self_exclude=True, per_query=True)
  hits = (res["rank"] < 1)[res["valid"]]
  # 0 and 1 find each other; 2's nearest is 3 (another class); 3 is left out; 4's is 2
  np.testing.assert_array_equal(hits, [True, True, False, True])
  v = pg.verdict(hits, np.ones(4, bool), alpha=0.4)
  assert (v.gains, v.losses, v.p_value) == (0, 1, 0.5)


def test_bad_arguments_are_refused():
  good = np.array([1, 0, 1], bool)
  with pytest.raises(ValueError, match="must score the same queries"):
    pg.verdict(good, good[:2])
  with pytest.raises(ValueError, match=r"with_memory must be a non-empty \[Q\]"):
    pg.verdict(good[None], good)
  with pytest.raises(ValueError, match=r"reference must be a non-empty \[Q\]"):
    pg.verdict(good, np.array([], bool))
  with pytest.raises(ValueError, match="reference must hold per-query hits"):
    pg.verdict(good, np.array([1, 2, 0]))
  for alpha in (0.0, 0.5):
    with pytest.raises(ValueError, match="alpha must be in"):
      pg.verdict(good, good, alpha=alpha)
  for looks in (0, 1.5):
    with pytest.raises(ValueError, match="looks must be a positive integer"):
      pg.verdict(good, good, looks=looks)
  with pytest.raises(ValueError, match="discordant_share"):
    pg.detectable_drop(n_queries=100, discordant_share=0.0)
