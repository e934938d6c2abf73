"""The memory term's fast forms (`xbm_jax.losses.fused.blocks`) against jax.grad of the plain form.

Oracle: the same loss through plain autodiff over `Rows` (`losses.*_plain`,
itself checked against NumPy loops in test_losses.py): value, statistics and
the anchors' gradient, with invalid rows on both sides, duplicates of anchors
(ties for the hardest pairs), every self rule and both reductions. The blocks
are made small (`fused.CHUNK`) so that the reference spans several of them,
the last overlapping its predecessor, and multi-similarity's listed positives
(`xbm_jax.losses.fused.ms`) span several gathered chunks. The sharded memory's fast forms are
checked against the replicated plain form in test_sharded_memory.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xbm_jax
from xbm_jax import losses
from xbm_jax.losses.fused import blocks as fused
from xbm_jax.losses.fused import ms as fused_ms

PAIRS = [  # (fast, plain, options)
  (losses.contrastive, losses.contrastive_plain, dict(margin=0.3)),
  (losses.multi_similarity, losses.multi_similarity_plain, dict()),
  (losses.multi_similarity, losses.multi_similarity_plain, dict(beta=10.0, mining_margin=0.3)),
  (losses.triplet, losses.triplet_plain, dict(margin=0.3)),
]


def _unit(rng, n, d):
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _case(seed):
  """Anchors and a memory: low dim, few labels (many active pairs), invalid rows,
  exact copies of anchors (the self rules' work) and a duplicated entry (ties)."""
  rng = np.random.default_rng(seed)
  q, ql, qv = _unit(rng, 10, 3), rng.integers(0, 3, 10).astype(np.int32), rng.random(10) < 0.8
  r, rl, rv = _unit(rng, 23, 3), rng.integers(0, 3, 23).astype(np.int32), rng.random(23) < 0.8
  r[:4], rl[:4], rv[:4] = q[:4], ql[:4], True
  r[12], rl[12] = r[13], rl[13]
  ids = (np.arange(10), np.concatenate([np.arange(4), 100 + np.arange(19)]))
  return (q, ql, qv, ids[0]), (r, rl, rv, ids[1])


def _run(fn, anchors, memory, kw):
  (q, ql, qv, q_ids), (r, rl, rv, r_ids) = anchors, memory

  def f(e, m):
    mem = xbm_jax.MemoryState(m, jnp.asarray(rl), jnp.asarray(rv), jnp.int32(0), jnp.asarray(r_ids))
    query = xbm_jax.Embeddings(e, jnp.asarray(ql), jnp.asarray(qv), jnp.asarray(q_ids))
    return fn(query, mem, return_stats=True, **kw)

  (value, stats), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
    jnp.asarray(q), jnp.asarray(r)
  )
  return value, stats, grads


@pytest.mark.slow
@pytest.mark.parametrize(
  "fast,plain,options", PAIRS[:2] + PAIRS[3:], ids=lambda x: getattr(x, "__name__", "")
)
@pytest.mark.parametrize("self_exclusion", ["similarity", "index", "id", "none"])
def test_fast_form_equals_plain_autodiff(monkeypatch, fast, plain, options, self_exclusion):
  monkeypatch.setattr(fused, "CHUNK", 5)  # 23 rows: 5 blocks, the last overlapping
  monkeypatch.setattr(fused, "LIST_CHUNK", 4)  # multi-similarity's listed positives: 4 a chunk
  anchors, memory = _case(4)
  kw = dict(options, self_exclusion=self_exclusion)
  if self_exclusion == "index":
    kw["self_index"] = jnp.asarray([0, 1, 2, 3] + [-1] * 6)
  for reduction in ("paper", "mean"):
    got = _run(fast, anchors, memory, dict(kw, reduction=reduction))
    want = _run(plain, anchors, memory, dict(kw, reduction=reduction))
    msg = f"{fast.__name__} {kw} {reduction}"
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7, err_msg=msg)
    assert got[1].keys() == want[1].keys()
    for k in want[1]:
      np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-6, atol=1e-7, err_msg=msg + k)
    np.testing.assert_allclose(got[2][0], want[2][0], rtol=1e-5, atol=1e-7, err_msg=msg)
    assert not np.any(np.asarray(got[2][1]))  # the memory, detached, gets none
    assert np.any(np.asarray(want[2][0]) != 0) and float(want[0]) > 0, msg


@pytest.mark.slow
@pytest.mark.parametrize(
  "chunk,pack,listed,bits",
  [(1, 4096, 1, 16), (4, 4096, 23, 1), (23, 4096, 5, 16), (64, 4096, 64, 0), (7, 4, 2, 1)],
)
def test_block_sizes_give_the_same_values(monkeypatch, chunk, pack, listed, bits):
  """One block, blocks that divide the memory, one row per block, and blocks too
  wide to pack two counts in one sum (`pack`); multi-similarity's listed positives
  in one chunk or several (`listed` rows each), their label table with one or two
  slots (`bits`: every row listed, a positive or not): same loss and gradient as
  the plain form."""
  monkeypatch.setattr(fused, "CHUNK", chunk)
  monkeypatch.setattr(fused, "PACK", pack)
  monkeypatch.setattr(fused, "LIST_CHUNK", listed)
  monkeypatch.setattr(fused_ms, "HASH_BITS", bits)
  anchors, memory = _case(9)
  for fast, plain, options in PAIRS:
    got, want = _run(fast, anchors, memory, options), _run(plain, anchors, memory, options)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7, err_msg=fast.__name__)
    np.testing.assert_allclose(got[2][0], want[2][0], rtol=1e-5, atol=1e-7, err_msg=fast.__name__)


@pytest.mark.parametrize("tied", [False, True])
def test_triplet_gradient_with_and_without_ties(monkeypatch, tied):
  """Hard triplet's backward gathers each anchor's two hardest rows where none is
  tied, and walks the memory again where some are (every row stored twice):
  both give the plain form's loss and gradient."""
  monkeypatch.setattr(fused, "CHUNK", 5)
  anchors, (r, rl, rv, ids) = _case(9)
  r, rl, rv = r.copy(), rl.copy(), rv.copy()
  if tied:  # rows 2k and 2k+1 equal: each extreme is tied with its twin
    r[1::2], rl[1::2], rv[1::2] = r[0:-1:2], rl[0:-1:2], rv[0:-1:2]
  else:  # the case's one duplicated entry made distinct
    r[12] = _unit(np.random.default_rng(0), 1, 3)[0]
  memory = (r, rl, rv, ids)
  q = jnp.asarray(anchors[0])
  sides = fused.Pairs(*(jnp.asarray(x) for x in (anchors[1], rl, anchors[2], rv)), 0, 0)
  rule = fused.Rule("none", 0.0, fused.CHUNK)
  counts = fused.scan_extremes(rule, q, jnp.asarray(r), sides)[1:4:2]
  assert bool(jnp.any(counts > 1)) == tied  # the path under test
  kw = dict(margin=0.3, self_exclusion="none")
  got, want = (
    _run(losses.triplet, anchors, memory, kw),
    _run(losses.triplet_plain, anchors, memory, kw),
  )
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got[2][0], want[2][0], rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(want[2][0]) != 0)


def test_fast_forms_run_where_they_apply():
  """A memory gets the fast form; a batch, or semihard/all triplets, the plain one
  (no `fused` call: a block size of 0 would fail)."""
  anchors, memory = _case(1)
  q = xbm_jax.Embeddings(jnp.asarray(anchors[0]), jnp.asarray(anchors[1]))
  batch = xbm_jax.Embeddings(jnp.asarray(memory[0]), jnp.asarray(memory[1]))
  mem = xbm_jax.MemoryState(batch.emb, batch.labels, jnp.ones(23, bool), jnp.int32(0))
  calls = []
  spy = lambda orig: lambda *a, **k: calls.append(1) or orig(*a, **k)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(fused, "scan_extremes", spy(fused.scan_extremes))
    mp.setattr(fused_ms, "positive_rows", spy(fused_ms.positive_rows))
    for mining in ("semihard", "all"):
      losses.triplet(q, mem, mining=mining)
    losses.multi_similarity(q, batch)
    assert not calls
    losses.multi_similarity(q, mem)
    losses.triplet(q, mem)
    assert len(calls) == 2


def test_multi_similarity_large_similarities_stay_finite(monkeypatch):
  """Rows of norm 3 (S up to 9: exp(beta (S - lam)) overflows float32 unshifted),
  the largest similarities in a late block (the online shift grows and rescales):
  the plain form's value and gradient, finite."""
  monkeypatch.setattr(fused, "CHUNK", 5)
  monkeypatch.setattr(fused, "LIST_CHUNK", 4)
  (q, ql, qv, q_ids), (r, rl, rv, r_ids) = _case(6)
  r = r.copy()
  r[18:] *= 3.0  # the last block's rows: the largest similarities, met last
  anchors, memory = (3.0 * q, ql, qv, q_ids), (r, rl, rv, r_ids)
  kw = dict(self_exclusion="none")
  got = _run(losses.multi_similarity, anchors, memory, kw)
  want = _run(losses.multi_similarity_plain, anchors, memory, kw)
  s = (3.0 * q) @ r.T
  assert np.max(40.0 * (s[:, 18:] - 0.5)) > 89  # exp of it: inf in float32
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[2][0], want[2][0], rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(got[2][0])))
