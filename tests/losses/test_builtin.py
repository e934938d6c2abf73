"""Losses against NumPy loops over pairs: values, gradients, masks, bf16, B=1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xbm_jax
from xbm_jax import losses
from tests.helpers import loss_oracles as oracle
from tests.helpers.sets import as_set, unit


def labeled(rng, n, d, n_classes, valid_frac=None):
  emb = unit(rng, n, d)
  labels = rng.integers(0, n_classes, size=n).astype(np.int32)
  valid = None if valid_frac is None else rng.random(n) < valid_frac
  return emb, labels, valid


CASES = [  # (loss name, jax kwargs, oracle)
  ("contrastive", {}, oracle.contrastive),
  ("contrastive", {"reduction": "mean"}, functools.partial(oracle.contrastive, reduction="mean")),
  ("multi_similarity", {}, oracle.multi_similarity),
  (
    "multi_similarity",
    {"reduction": "mean"},
    functools.partial(oracle.multi_similarity, reduction="mean"),
  ),
  ("triplet", {"mining": "all"}, functools.partial(oracle.triplet, mining="all")),
  ("triplet", {"mining": "hard"}, functools.partial(oracle.triplet, mining="hard")),
  ("triplet", {"mining": "semihard"}, functools.partial(oracle.triplet, mining="semihard")),
  (
    "triplet",
    {"mining": "all", "reduction": "mean"},
    functools.partial(oracle.triplet, mining="all", reduction="mean"),
  ),
]


@pytest.mark.parametrize("name,kwargs,ref", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_numpy_loop(name, kwargs, ref, seed):
  rng = np.random.default_rng(seed)
  # Low dim and few classes so that many pairs are active on both sides.
  q, ql, qv = labeled(rng, 12, 3, 4, valid_frac=0.8)
  r, rl, rv = labeled(rng, 30, 3, 4, valid_frac=0.7)
  r[:3] = q[:3]  # exact duplicates of anchors: the self rule must drop them
  rl[:3] = ql[:3]
  got = losses.get(name)(as_set(q, ql, qv), as_set(r, rl, rv), **kwargs)
  want = ref(q, ql, r, rl, qv, rv)
  np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,ref", CASES[::2])
def test_in_batch_and_single_anchor(name, kwargs, ref):
  rng = np.random.default_rng(3)
  q, ql, _ = labeled(rng, 16, 4, 3)
  got = losses.get(name)(as_set(q, ql), as_set(q, ql), **kwargs)
  np.testing.assert_allclose(float(got), ref(q, ql, q, ql), rtol=2e-5, atol=2e-6)
  # B = 1 against a reference.
  r, rl, _ = labeled(rng, 9, 4, 3)
  got1 = losses.get(name)(as_set(q[:1], ql[:1]), as_set(r, rl), **kwargs)
  np.testing.assert_allclose(float(got1), ref(q[:1], ql[:1], r, rl), rtol=2e-5, atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,ref", CASES)
def test_gradient_matches_finite_differences(name, kwargs, ref):
  """jax.grad vs central differences of the NumPy oracle, in float64."""
  rng = np.random.default_rng(7)
  q, ql, qv = labeled(rng, 6, 3, 3, valid_frac=0.9)
  r, rl, rv = labeled(rng, 14, 3, 3, valid_frac=0.8)
  with jax.enable_x64(True):
    f = lambda e: losses.get(name)(
      xbm_jax.Embeddings(e, jnp.asarray(ql), jnp.asarray(qv)), as_set(r, rl, rv), **kwargs
    )
    g = np.asarray(jax.grad(f)(jnp.asarray(q, jnp.float64)))
  h = 1e-6
  q64 = q.astype(np.float64)
  for i, k in [(0, 0), (1, 2), (3, 1), (5, 0), (2, 2)]:
    qp, qm = q64.copy(), q64.copy()
    qp[i, k] += h
    qm[i, k] -= h
    fd = (ref(qp, ql, r, rl, qv, rv) - ref(qm, ql, r, rl, qv, rv)) / (2 * h)
    np.testing.assert_allclose(g[i, k], fd, rtol=1e-4, atol=1e-6, err_msg=f"entry {(i, k)}")


@pytest.mark.parametrize("name,kwargs,ref", CASES[::2])
def test_bfloat16_inputs(name, kwargs, ref):
  rng = np.random.default_rng(11)
  q, ql, _ = labeled(rng, 10, 8, 3)
  r, rl, rv = labeled(rng, 20, 8, 3, valid_frac=0.8)
  qb, rb = jnp.asarray(q, jnp.bfloat16), jnp.asarray(r, jnp.bfloat16)
  got = losses.get(name)(
    xbm_jax.Embeddings(qb, jnp.asarray(ql)),
    xbm_jax.Embeddings(rb, jnp.asarray(rl), jnp.asarray(rv)),
    **kwargs,
  )
  assert got.dtype == jnp.float32
  # The oracle sees the same bf16-rounded vectors: the loss itself runs in f32.
  want = ref(
    np.asarray(qb.astype(jnp.float32)), ql, np.asarray(rb.astype(jnp.float32)), rl, None, rv
  )
  np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_invalid_reference_rows_are_ignored():
  rng = np.random.default_rng(5)
  q, ql, _ = labeled(rng, 8, 4, 3)
  r, rl, _ = labeled(rng, 12, 4, 3)
  valid = np.arange(12) < 7
  garbage = r.copy()
  garbage[7:] = unit(rng, 5, 4)
  a = losses.contrastive(as_set(q, ql), as_set(r, rl, valid))
  b = losses.contrastive(as_set(q, ql), as_set(garbage, rl, valid))
  c = losses.contrastive(as_set(q, ql), as_set(r[:7], rl[:7]))
  assert float(a) == pytest.approx(float(b)) == pytest.approx(float(c))


@pytest.mark.slow
def test_self_exclusion_by_index_vs_similarity():
  """'index' drops exactly the anchor's slot; 'similarity' drops every duplicate."""
  rng = np.random.default_rng(2)
  q, ql, _ = labeled(rng, 6, 4, 2)
  r = np.concatenate([q, q[:2]])  # anchors 0 and 1 appear twice
  rl = np.concatenate([ql, ql[:2]])
  idx = np.arange(6, dtype=np.int32)
  by_index = losses.contrastive(
    as_set(q, ql), as_set(r, rl), self_exclusion="index", self_index=jnp.asarray(idx)
  )
  want = oracle.contrastive(q, ql, r, rl, self_index=idx)
  np.testing.assert_allclose(float(by_index), want, rtol=1e-5)
  by_sim = losses.contrastive(as_set(q, ql), as_set(r, rl))
  # The duplicates are positives at S = 1 under 'index' and add (1 - 1) = 0 terms,
  # so here the two rules agree in value but not in pair counts.
  _, st_i = losses.contrastive(
    as_set(q, ql),
    as_set(r, rl),
    self_exclusion="index",
    self_index=jnp.asarray(idx),
    return_stats=True,
  )
  _, st_s = losses.contrastive(as_set(q, ql), as_set(r, rl), return_stats=True)
  assert int(st_i["pos_pairs"]) == int(st_s["pos_pairs"]) + 2
  np.testing.assert_allclose(float(by_sim), float(by_index), atol=1e-6)
  with pytest.raises(ValueError, match="self_index"):
    losses.contrastive(as_set(q, ql), as_set(r, rl), self_exclusion="index")


def test_stats_count_pairs_by_hand():
  # Hand-made 2-D unit vectors: anchor 0 (label 0) against four references.
  ang = np.deg2rad([0.0, 30.0, 60.0, 100.0])
  r = np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32)
  rl = np.array([0, 0, 1, 1], np.int32)
  q, ql = r[:1], rl[:1]
  loss, st = losses.contrastive(as_set(q, ql), as_set(r, rl), return_stats=True)
  # positives: slot 0 is the anchor itself (S = 1, dropped); slot 1 S = cos 30.
  # negatives: cos 60 = 0.5 is not > 0.5; cos 100 < 0. So one positive, no negative.
  assert int(st["pos_pairs"]) == 1 and int(st["neg_pairs"]) == 0
  np.testing.assert_allclose(float(loss), 1 - np.cos(np.deg2rad(30)), rtol=1e-6)
  np.testing.assert_allclose(float(st["mean_pos_sim"]), np.cos(np.deg2rad(30)), rtol=1e-6)


@pytest.mark.slow
def test_empty_reference_gives_zero_loss_and_finite_grad():
  rng = np.random.default_rng(0)
  q, ql, _ = labeled(rng, 4, 8, 2)
  mem = xbm_jax.memory.init(size=16, dim=8)
  for name in losses.LOSSES:
    f = lambda e: losses.get(name)(xbm_jax.Embeddings(e, jnp.asarray(ql)), mem)
    value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(q))  # one compile, not op by op
    assert float(value) == 0.0
    assert np.all(np.isfinite(np.asarray(grad)))


def test_bad_input_errors():
  e = jnp.zeros((4, 8))
  with pytest.raises(ValueError, match="labels"):
    losses.contrastive(
      xbm_jax.Embeddings(e, jnp.zeros((3,), jnp.int32)),
      xbm_jax.Embeddings(e, jnp.zeros((4,), jnp.int32)),
    )
  with pytest.raises(TypeError, match="integers"):
    losses.contrastive(
      xbm_jax.Embeddings(e, jnp.zeros((4,))), xbm_jax.Embeddings(e, jnp.zeros((4,), jnp.int32))
    )
  with pytest.raises(ValueError, match="dim"):
    losses.contrastive(
      xbm_jax.Embeddings(e, jnp.zeros((4,), jnp.int32)),
      xbm_jax.Embeddings(jnp.zeros((4, 5)), jnp.zeros((4,), jnp.int32)),
    )
  with pytest.raises(ValueError, match="unknown loss"):
    losses.get("arcface")
  with pytest.raises(ValueError, match="mining"):
    losses.triplet(
      xbm_jax.Embeddings(e, jnp.zeros((4,), jnp.int32)),
      xbm_jax.Embeddings(e, jnp.zeros((4,), jnp.int32)),
      mining="easy",
    )


@pytest.mark.slow
def test_bf16_memory_never_keeps_the_anchors_own_slot():
  """Rounding to bf16 moves a unit vector's self-similarity off 1 by ~1e-3; the default
  threshold must still drop the anchor's own memory slot (labels all distinct here)."""
  rng = np.random.default_rng(0)
  q = xbm_jax.Embeddings(jnp.asarray(unit(rng, 8, 128)), jnp.arange(8, dtype=jnp.int32))
  mem = xbm_jax.memory.enqueue(xbm_jax.memory.init(size=16, dim=128, dtype=jnp.bfloat16), q)
  for name in losses.LOSSES:
    loss, st = losses.get(name)(q, mem, reduction="mean", return_stats=True)
    assert int(st["pos_pairs"]) == 0, name
  loss, _ = losses.contrastive(q, mem, reduction="mean", return_stats=True)
  assert float(loss) == 0.0


def test_float32_keeps_a_near_duplicate_positive_and_drops_the_copy():
  """In float32 the self rule is tight: a distinct same-label entry at S = 1 - 1e-4
  is a positive (1e-4 away from the anchor), the anchor's exact copy is not."""
  rng = np.random.default_rng(1)
  q = unit(rng, 1, 16)[0].astype(np.float64)
  perp = rng.normal(size=16)
  perp -= perp.dot(q) * q
  perp /= np.linalg.norm(perp)
  angle = np.arccos(1 - 1e-4)
  near = np.cos(angle) * q + np.sin(angle) * perp
  refs = np.stack([q, near]).astype(np.float32)
  anchor = as_set(q[None].astype(np.float32), np.zeros(1, np.int32))
  loss, st = losses.contrastive(anchor, as_set(refs, np.zeros(2, np.int32)), return_stats=True)
  assert int(st["pos_pairs"]) == 1
  np.testing.assert_allclose(float(st["mean_pos_sim"]), 1 - 1e-4, atol=2e-6)
  np.testing.assert_allclose(float(loss), 1e-4, rtol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("self_exclusion", ["similarity", "index", "id", "none"])
def test_contrastive_one_pass_equals_plain_autodiff(self_exclusion):
  """`contrastive` against a memory (custom VJP, one pass) against
  `contrastive_plain` (jax.grad of the plain form): value, statistics and the
  anchors' gradient; the memory, detached, gets none. Against a batch both are
  the plain form, the reference's gradient included."""
  rng = np.random.default_rng(4)
  q, ql, qv = labeled(rng, 10, 3, 3, valid_frac=0.8)
  r, rl, rv = labeled(rng, 24, 3, 3, valid_frac=0.8)
  r[:4], rl[:4] = q[:4], ql[:4]
  q_ids, r_ids = jnp.arange(10), jnp.concatenate([jnp.arange(4), 100 + jnp.arange(20)])
  kw = dict(self_exclusion=self_exclusion, margin=0.3, return_stats=True)
  if self_exclusion == "index":
    kw["self_index"] = jnp.asarray([0, 1, 2, 3] + [-1] * 6)

  def ref_set(e):
    return xbm_jax.MemoryState(e, jnp.asarray(rl), jnp.asarray(rv), jnp.int32(0), r_ids)

  def run(fn, reduction):
    f = lambda e, m: fn(
      xbm_jax.Embeddings(e, jnp.asarray(ql), jnp.asarray(qv), q_ids),
      ref_set(m),
      reduction=reduction,
      **kw,
    )
    (value, stats), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
      jnp.asarray(q), jnp.asarray(r)
    )
    return value, stats, grads

  for reduction in ("paper", "mean"):
    fast, plain = run(losses.contrastive, reduction), run(losses.contrastive_plain, reduction)
    np.testing.assert_allclose(fast[0], plain[0], rtol=1e-6, atol=1e-7)
    assert fast[1].keys() == plain[1].keys()
    for k in plain[1]:
      np.testing.assert_allclose(fast[1][k], plain[1][k], rtol=1e-6, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(fast[2][0], plain[2][0], rtol=1e-6, atol=1e-7)
    assert not np.any(np.asarray(fast[2][1]))
    assert np.any(np.asarray(plain[2][0]) != 0) and int(plain[1]["pos_pairs"]) > 0
