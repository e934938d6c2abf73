"""Threshold calibration against a brute-force scan of every candidate; Matcher."""

import numpy as np
import pytest

from xbm_jax.inference import threshold as th
from xbm_jax.inference.index import Index


def labelled_set(seed=0, classes=12, per=5, d=8, noise=0.6):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(classes, d))
  x = np.repeat(centres, per, 0) + noise * rng.normal(size=(classes * per, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x.astype(np.float32), np.repeat(np.arange(classes), per)


def scan(emb, labels):
  """Oracle: (threshold, precision, recall) for every candidate from all pairs, by masks."""
  n = len(labels)
  s = emb.astype(np.float64) @ emb.astype(np.float64).T
  iu = np.triu_indices(n, 1)
  s, same = s[iu], (labels[:, None] == labels[None, :])[iu]
  out = []
  for t in np.unique(s):
    pred = s >= t
    out.append((t, (pred & same).sum() / pred.sum(), (pred & same).sum() / same.sum()))
  return out


@pytest.mark.parametrize("goal", [0.5, 0.8, 0.95, 1.0])
def test_precision_target_is_the_lowest_threshold_reaching_it(goal):
  emb, labels = labelled_set()
  t = th.calibrate(*th.pair_scores(emb, labels), precision=goal)
  ok = [(v, p, r) for v, p, r in scan(emb, labels) if p >= goal]
  v, p, r = min(ok)
  assert t.value == pytest.approx(v, abs=1e-12)
  assert t.precision == pytest.approx(p) and t.recall == pytest.approx(r)
  assert t.num_positive_pairs == 12 * 10 and t.num_negative_pairs == 60 * 59 // 2 - 120


@pytest.mark.parametrize("goal", [0.3, 0.9, 1.0])
def test_recall_target_is_the_highest_threshold_reaching_it(goal):
  emb, labels = labelled_set(seed=1)
  t = th.calibrate(*th.pair_scores(emb, labels), recall=goal)
  v, p, r = max((v, p, r) for v, p, r in scan(emb, labels) if r >= goal)
  assert t.value == pytest.approx(v, abs=1e-12) and t.recall == pytest.approx(r)


def test_sampled_pairs_estimate_the_whole_set_s_precision():
  emb, labels = labelled_set(seed=2, classes=40, per=10, d=16, noise=0.5)
  exact = th.calibrate(*th.pair_scores(emb, labels), precision=0.9)
  sampled = th.calibrate(*th.pair_scores(emb, labels, max_pairs=20_000, seed=0), precision=0.9)
  # The sampled threshold's precision, measured on all pairs by a mask, is near the target.
  s = emb.astype(np.float64) @ emb.astype(np.float64).T
  iu = np.triu_indices(len(labels), 1)
  s, same = s[iu], (labels[:, None] == labels[None, :])[iu]
  pred = s >= sampled.value
  assert sampled.num_positive_pairs + sampled.num_negative_pairs <= 20_000
  assert abs((pred & same).sum() / pred.sum() - 0.9) < 0.05
  assert abs(sampled.value - exact.value) < 0.05


def test_unreachable_targets_and_bad_sets_are_one_line_errors():
  emb, labels = labelled_set(noise=5.0)
  with pytest.raises(th.CalibrationError, match="no threshold reaches precision 1.0"):
    th.calibrate(*th.pair_scores(emb, labels), precision=1.0)
  with pytest.raises(th.CalibrationError, match="every label occurs once"):
    th.pair_scores(emb[:5], np.arange(5))
  with pytest.raises(th.CalibrationError, match="unlabelled"):
    th.pair_scores(emb[:5], -np.ones(5, int))
  with pytest.raises(th.CalibrationError, match="exactly one"):
    th.calibrate([0.1], [True])


def test_matcher_uses_the_threshold_for_pairs_and_index_entries(tmp_path):
  emb, labels = labelled_set(seed=3)
  t = th.calibrate(*th.pair_scores(emb, labels), precision=0.9)
  t.save(str(tmp_path / "t.json"))
  t = th.Threshold.load(str(tmp_path / "t.json"))
  index = Index(8).add(emb, labels=labels, ids=np.arange(100, 160))
  m = th.Matcher(t, index=index)
  s = emb.astype(np.float64) @ emb.astype(np.float64).T
  assert m.is_match(emb[0], emb[1]) == (s[0, 1] >= t.value)
  np.testing.assert_array_equal(m.is_match(emb[:10], emb[10:20]), np.diag(s[:10, 10:20]) >= t.value)
  got = m.matches(emb[:3], k=60)
  for qi, hits in enumerate(got):
    want = sorted(np.flatnonzero(s[qi] >= t.value), key=lambda j: (-s[qi, j], j))
    assert [h["id"] for h in hits] == [100 + j for j in want]
