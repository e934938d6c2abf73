"""The self-pair rule `S < 1 - 1e-5` at an accelerator's matmul precision.

CPU computes float32 dots exactly whatever their precision, so the GPU's TF32
and the TPU's bf16 products are emulated (`tests/helpers/precision.py`): every dot
not at `Precision.HIGHEST` gets its operands' mantissas rounded. Oracles: a
NumPy count of same-label, non-self pairs, and the loss computed exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xbm_jax import losses, memory
from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.embeddings import Embeddings
from tests.helpers import precision as prec

N, AX = 8, "data"
G, D = 64, 128  # the case: 64 unit rows of 128 features
EMULATIONS = {
  "tf32_truncate": (prec.TF32_BITS, True),
  "tf32_nearest": (prec.TF32_BITS, False),
  "bf16": (prec.BF16_BITS, False),
}
LOSSES = [("contrastive", {}), ("multi_similarity", {}), ("triplet", {"mining": "hard"})]


def _unit_rows(seed, n=G, d=D):
  x = np.random.default_rng(seed).normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _labels(seed, n=G):
  return np.random.default_rng(seed).integers(0, 8, size=n).astype(np.int32)


def _same_label_pairs(q_labels, r_labels, self_pairs):
  """Oracle: same-label pairs, minus each anchor's own copies (`self_pairs`)."""
  return int(np.sum(q_labels[:, None] == r_labels[None, :])) - self_pairs


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("bits", [prec.TF32_BITS, prec.BF16_BITS])
def test_round_mantissa_matches_numpy(bits, truncate):
  x = np.concatenate([_unit_rows(0).ravel(), np.float32([1.0, -3.0, 1 + 2**-11, 0.0])])
  got = np.asarray(prec.round_mantissa(jnp.asarray(x), bits, truncate))
  np.testing.assert_array_equal(got, prec.np_round_mantissa(x, bits, truncate))
  assert np.any(got != x)


@pytest.mark.parametrize("emu", EMULATIONS)
def test_default_precision_breaks_the_self_rule(emu):
  """The emulation reproduces the bug: a DEFAULT-precision product moves unit
  rows' self-similarities out of [1 - 1e-5, 1]; truncation (raw float32 fed
  to TF32 tensor cores) puts every one of them below the threshold."""
  bits, truncate = EMULATIONS[emu]
  e = jnp.asarray(_unit_rows(1))
  seen = []
  diag = np.diag(prec.emulate(lambda a: a @ a.T, bits, truncate=truncate, seen=seen)(e))
  assert seen, "no dot was emulated"
  below = np.sum(diag < 1 - losses.EPS_SELF)
  assert below == G if truncate else below >= G // 8, diag


@pytest.mark.slow
@pytest.mark.parametrize("emu", EMULATIONS)
@pytest.mark.parametrize("name,kw", LOSSES)
def test_losses_keep_self_pairs_excluded(emu, name, kw):
  """In-batch and memory terms (the memory holds the batch, as after XBM's
  enqueue): the emulated loss equals the exact one, pair counts included."""
  bits, truncate = EMULATIONS[emu]
  e, labels = jnp.asarray(_unit_rows(2)), _labels(2)
  mem = memory.enqueue(
    memory.init(size=2 * G, dim=D), Embeddings(jnp.asarray(_unit_rows(3)), jnp.asarray(_labels(3)))
  )
  mem = memory.enqueue(mem, Embeddings(e, jnp.asarray(labels)))

  def f(e_):
    batch = Embeddings(e_, jnp.asarray(labels))
    return (
      losses.get(name)(batch, batch, return_stats=True, **kw),
      losses.get(name)(batch, mem, return_stats=True, **kw),
    )

  seen = []
  # Jitted: one compile each instead of op-by-op dispatch (`seen` fills at trace time).
  got = jax.jit(prec.emulate(f, bits, truncate=truncate, seen=seen))(e)
  want = jax.jit(f)(e)
  # At least one product per term (the memory term's fused form has two: S and dS @ M).
  assert len(seen) >= 2 and all(s is not None for s in seen), seen
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, err_msg=f"{name} {emu}"), got, want)
  if name == "contrastive":  # every positive pair is active: count them
    n_pos = _same_label_pairs(labels, labels, G)
    assert int(got[0][1]["pos_pairs"]) == n_pos
    mem_labels = np.asarray(mem.labels)
    assert int(got[1][1]["pos_pairs"]) == _same_label_pairs(labels, mem_labels, G)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == N, "conftest must provide 8 fake CPU devices"
  return jax.make_mesh((N,), (AX,))


@functools.lru_cache(maxsize=None)
def _sharded(mesh, name, kw_items, bits, truncate):
  """Per-device `(loss, stats)` of the sharded loss, its body emulated."""
  fn = functools.partial(losses.get(name), axis_name=AX, return_stats=True, **dict(kw_items))

  def body(e, l, mem):
    loss, stats = prec.emulate(lambda e_: fn(Embeddings(e_, l), mem), bits, truncate=truncate)(e)
    return loss[None], jax.tree.map(lambda x: x[None], stats)

  return jax.jit(
    jax.shard_map(
      body, mesh=mesh, in_specs=(P(AX), P(AX), sharded_memory.specs(AX)), out_specs=P(AX)
    )
  )


@pytest.mark.slow
@pytest.mark.parametrize("emu", ["tf32_truncate", "bf16"])
@pytest.mark.parametrize("name,kw", LOSSES)
def test_sharded_losses_keep_self_pairs_excluded(mesh, emu, name, kw):
  """The memory, split over 8 devices, holds a permutation of the global batch:
  the emulated sharded loss equals the exact replicated one on each device."""
  bits, truncate = EMULATIONS[emu]
  e, labels = _unit_rows(4), _labels(4)
  perm = np.random.default_rng(5).permutation(G)
  mem = sharded_memory.init(size=G, dim=D, n_shards=N)._replace(
    emb=jnp.asarray(e[perm]), labels=jnp.asarray(labels[perm]), valid=jnp.ones((G,), bool)
  )
  mem = sharded_memory.put(mem, mesh)
  split = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, P(AX)))
  per, stats = jax.device_get(
    _sharded(mesh, name, tuple(kw.items()), bits, truncate)(
      split(jnp.asarray(e)), split(jnp.asarray(labels)), mem
    )
  )
  full = Embeddings(jnp.asarray(e[perm]), jnp.asarray(labels[perm]))
  b = G // N
  for d in range(N):
    q = Embeddings(jnp.asarray(e[d * b : (d + 1) * b]), jnp.asarray(labels[d * b : (d + 1) * b]))
    want_loss, want_stats = losses.get(name)(q, full, return_stats=True, **kw)
    np.testing.assert_allclose(per[d], want_loss, rtol=1e-5, err_msg=f"{name} dev {d}")
    for k, v in want_stats.items():
      np.testing.assert_allclose(
        stats[k][d], v, rtol=1e-5, atol=1e-6, err_msg=f"{name} {k} dev {d}"
      )
  if name == "contrastive":
    assert int(np.sum(stats["pos_pairs"])) == _same_label_pairs(labels, labels, G)
