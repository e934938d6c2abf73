"""benchmarks/head_study.py: the in-script supcon loss against a NumPy oracle, the P x K
sampler, and one short training chunk (finite, memory filled)."""

import numpy as np

from benchmarks import head_study as hs
from xbm_jax import memory as memory_lib
from xbm_jax.embeddings import Embeddings
import pytest


def _unit(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.slow
def test_supcon_matches_numpy_oracle_in_batch_and_against_a_memory():
  rng = np.random.default_rng(0)
  q, ql = _unit(rng, 12, 8), rng.integers(0, 4, 12)
  for t in (0.1, 0.5):
    got = float(hs.supcon(Embeddings(q, ql), Embeddings(q, ql), temperature=t))
    np.testing.assert_allclose(got, hs.supcon_oracle(q, ql, q, ql, t), rtol=1e-5)
  mem = memory_lib.init(size=40, dim=8)
  r, rl = _unit(rng, 30, 8), rng.integers(0, 4, 30)
  mem = memory_lib.enqueue(mem, Embeddings(r, rl))  # 10 slots stay invalid
  got = float(hs.supcon(Embeddings(q, ql), mem, temperature=0.2))
  np.testing.assert_allclose(got, hs.supcon_oracle(q, ql, r, rl, 0.2), rtol=1e-5)


def test_pk_batches_take_whole_classes_each_epoch():
  labels = np.repeat(np.arange(40), 4)
  b = hs.pk_batches(labels, 5, seed=3)
  assert b.shape == (5, hs.P * hs.K)
  first_epoch = labels[b[:2]].reshape(-1)  # 2 steps x 16 classes of 40: no repeats
  assert len(set(first_epoch)) == 32 and all(np.bincount(first_epoch)[np.unique(first_epoch)] == 4)
  np.testing.assert_array_equal(b, hs.pk_batches(labels, 5, seed=3))


@pytest.mark.slow
def test_a_memory_arm_trains_one_chunk():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(32), 4)
  feats = rng.normal(size=(128, 16)).astype(np.float32) + labels[:, None] * 0.1
  arm = hs.ARMS["supcon_memory_momentum"]
  point = {"lr": 1e-3, "schedule": "cosine", "hp": {"temperature": 0.1}}
  res = hs.train_run(
    arm,
    point,
    0,
    steps=4,
    train=(feats, labels),
    evals={"val": (feats, labels)},
    eval_at=[4],
    chunk=4,
  )
  last = res["curve"][-1]
  assert last["step"] == 4 and np.isfinite(last["loss"]) and last["loss_xbm"] > 0
