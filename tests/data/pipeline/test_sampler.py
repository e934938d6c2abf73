"""P x K sampler invariants, checked by brute force over many steps."""

import numpy as np
import pytest

from xbm_jax.data.sampler import PKSampler, SamplerState


def _labels(sizes, seed=0):
  """Labels with class c (label 100 + 3c, not contiguous) of sizes[c] images, shuffled."""
  labels = np.concatenate([np.full(n, 100 + 3 * c) for c, n in enumerate(sizes)])
  return np.random.default_rng(seed).permutation(labels)


SIZES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 4, 4, 2, 6, 11, 1, 3, 5, 7, 20, 4, 4, 4, 8]


def test_every_batch_is_p_distinct_classes_times_k():
  labels = _labels(SIZES)
  p, k = 6, 4
  s = PKSampler(labels, classes_per_batch=p, samples_per_class=k, seed=3)
  members = {lab: set(np.flatnonzero(labels == lab)) for lab in np.unique(labels)}
  for step in range(40):
    idx = s.global_batch(step)
    assert idx.shape == (p * k,) and idx.dtype == np.int64
    blocks = labels[idx].reshape(p, k)
    assert (blocks == blocks[:, :1]).all()  # K rows of one class each
    assert len(set(blocks[:, 0])) == p  # P distinct classes
    for row, lab in zip(idx.reshape(p, k), blocks[:, 0]):
      n = len(members[lab])
      assert set(row) <= members[lab]
      if n >= k:
        assert len(set(row)) == k  # no repeats in a big class
      else:
        assert set(row) == members[lab]  # small class: all images + resampled


def test_singleton_class_padded_or_dropped():
  labels = _labels([1, 5, 5, 5])
  s = PKSampler(labels, classes_per_batch=4, samples_per_class=3, seed=0)
  single = np.flatnonzero(labels == 100)[0]
  batch = s.global_batch(0).reshape(4, 3)
  row = [r for r in batch if labels[r[0]] == 100][0]
  np.testing.assert_array_equal(row, [single] * 3)
  s2 = PKSampler(labels, classes_per_batch=3, samples_per_class=3, seed=0, min_class_size=2)
  for step in range(10):
    assert 100 not in labels[s2.global_batch(step)]


def test_each_epoch_visits_classes_without_repeats():
  labels = _labels(SIZES)
  s = PKSampler(labels, classes_per_batch=5, samples_per_class=2, seed=1)
  assert s.steps_per_epoch == len(SIZES) // 5
  for epoch in range(3):
    seen = [
      labels[s.global_batch(t)[0::2]]
      for t in range(epoch * s.steps_per_epoch, (epoch + 1) * s.steps_per_epoch)
    ]
    seen = np.concatenate(seen)
    assert len(seen) == len(set(seen)) == 5 * s.steps_per_epoch


def test_deterministic_given_seed_and_seed_matters():
  labels = _labels(SIZES)
  a = PKSampler(labels, classes_per_batch=4, samples_per_class=4, seed=7)
  b = PKSampler(labels, classes_per_batch=4, samples_per_class=4, seed=7)
  c = PKSampler(labels, classes_per_batch=4, samples_per_class=4, seed=8)
  steps = [0, 1, 5, 17, 3, 1]  # random access, any order
  for t in steps:
    np.testing.assert_array_equal(a.global_batch(t), b.global_batch(t))
  assert any(not np.array_equal(a.global_batch(t), c.global_batch(t)) for t in range(5))


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_are_disjoint_and_union_is_global_batch(hosts):
  labels = _labels(SIZES)
  p, k = 8, 3
  ref = PKSampler(labels, classes_per_batch=p, samples_per_class=k, seed=2)
  shards = [
    PKSampler(
      labels, classes_per_batch=p, samples_per_class=k, seed=2, process_index=h, process_count=hosts
    )
    for h in range(hosts)
  ]
  for step in range(12):
    local = [sh.local_batch(step) for sh in shards]
    assert all(len(x) == p * k // hosts for x in local)
    np.testing.assert_array_equal(np.concatenate(local), ref.global_batch(step))
    classes = [set(labels[x]) for x in local]
    for i in range(hosts):
      for j in range(i + 1, hosts):
        assert not classes[i] & classes[j]
    assert [sh.local_offset() for sh in shards] == [h * p * k // hosts for h in range(hosts)]


def test_state_roundtrip():
  labels = _labels(SIZES)
  s = PKSampler(labels, classes_per_batch=4, samples_per_class=2, seed=5)
  st = s.state(42).to_dict()
  assert st == {"step": 42, "seed": 5}
  assert SamplerState.from_dict(st) == SamplerState(step=42, seed=5)


def test_errors():
  labels = _labels([3, 3, 3])
  with pytest.raises(ValueError, match="classes_per_batch=4.*only 3 classes"):
    PKSampler(labels, classes_per_batch=4, samples_per_class=2)
  with pytest.raises(ValueError, match="only 2 classes"):
    PKSampler(_labels([1, 3, 3]), classes_per_batch=3, samples_per_class=2, min_class_size=2)
  with pytest.raises(ValueError, match="divisible by process_count"):
    PKSampler(labels, classes_per_batch=3, samples_per_class=2, process_count=2)
  with pytest.raises(ValueError, match="integers"):
    PKSampler(labels.astype(float), classes_per_batch=2, samples_per_class=2)
