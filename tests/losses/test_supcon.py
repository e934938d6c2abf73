"""The supervised InfoNCE built-in (`losses.supcon`): value against the NumPy loop, the
gradient against plain autodiff of a dense softmax, and 8 devices (replicated and sharded
memory) against one. The memory study's own supcon (benchmarks/head_study.py) is the
same loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from xbm_jax import losses, memory
from xbm_jax.embeddings import Embeddings
from xbm_jax.memory import sharded as sharded_memory
from tests.helpers import loss_oracles as oracle
from tests.helpers.sets import as_set, unit

N, B, D, SIZE, AX = 8, 2, 4, 32, "data"


def dense_supcon(q, ql, r, rl, temperature):
  """The loss as one masked softmax over the `[B, R]` matrix (plain jnp autodiff)."""
  s = q @ r.T
  cand = jax.lax.stop_gradient(s) < 1 - 1e-5
  cand = cand | (ql[:, None] != rl[None, :])
  pos = cand & (ql[:, None] == rl[None, :])
  logits = jnp.where(cand, s / temperature, -jnp.inf)
  logp = jnp.where(pos, logits - jax.nn.logsumexp(logits, axis=1, keepdims=True), 0.0)
  npos = pos.sum(axis=1)
  per = jnp.where(npos > 0, -logp.sum(axis=1) / jnp.maximum(npos, 1), 0.0)
  return per.sum() / q.shape[0]  # "paper": over the anchors


@pytest.mark.parametrize("reduction", ["paper", "mean"])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_value_equals_the_numpy_loop_in_batch_and_against_a_memory(reduction, temperature):
  rng = np.random.default_rng(0)
  q, ql = unit(rng, 12, D), rng.integers(0, 4, 12).astype(np.int32)
  m, ml = unit(rng, 20, D), rng.integers(0, 4, 20).astype(np.int32)
  mv = rng.random(20) < 0.8
  kw = dict(temperature=temperature, reduction=reduction)
  got = losses.supcon(as_set(q, ql), as_set(q, ql), **kw)
  np.testing.assert_allclose(float(got), oracle.supcon(q, ql, q, ql, **kw), rtol=1e-5)
  got = losses.supcon(as_set(q, ql), as_set(m, ml, mv), **kw)
  want = oracle.supcon(q, ql, m, ml, rv=mv, **kw)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_gradient_equals_plain_autodiff_of_the_dense_softmax():
  rng = np.random.default_rng(1)
  q, ql = unit(rng, 12, D), rng.integers(0, 3, 12).astype(np.int32)
  fn = lambda e: losses.supcon(as_set(e, ql), as_set(e, ql), temperature=0.1)
  dense = lambda e: dense_supcon(e, jnp.asarray(ql), e, jnp.asarray(ql), 0.1)
  np.testing.assert_allclose(float(fn(jnp.asarray(q))), float(dense(jnp.asarray(q))), rtol=1e-5)
  g, g_dense = jax.grad(fn)(jnp.asarray(q)), jax.grad(dense)(jnp.asarray(q))
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_dense), rtol=1e-4, atol=1e-6)
  assert np.any(np.asarray(g) != 0)


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "sharded"])
def test_eight_devices_equal_one(sharded):
  rng = np.random.default_rng(2)
  q, ql = unit(rng, N * B, D), rng.integers(0, 3, N * B).astype(np.int32)
  m, ml = unit(rng, SIZE, D), rng.integers(0, 3, SIZE).astype(np.int32)
  mv = rng.random(SIZE) < 0.8
  mesh = jax.make_mesh((N,), (AX,))
  mem = memory.MemoryState(jnp.asarray(m), jnp.asarray(ml), jnp.asarray(mv), jnp.int32(0))
  if sharded:
    mem = sharded_memory.put(mem._replace(ptr=jnp.zeros((N,), jnp.int32)), mesh)
    mem_spec = sharded_memory.specs(AX)
  else:
    mem = jax.device_put(mem, NamedSharding(mesh, P()))
    mem_spec = memory.MemoryState(P(), P(), P(), P())

  def body(e, l, mem):
    extra = {"axis_name": AX} if sharded else {}
    value = losses.supcon(Embeddings(e, l), mem, data_axis=AX, temperature=0.2, **extra)
    return jax.lax.pmean(value, AX)

  run = jax.shard_map(body, mesh=mesh, in_specs=(P(AX), P(AX), mem_spec), out_specs=P())
  split = NamedSharding(mesh, P(AX))
  args = [jax.device_put(jnp.asarray(x), split) for x in (q, ql)]
  value, grad = jax.jit(jax.value_and_grad(run))(*args, mem)
  want = oracle.supcon(q, ql, m, ml, rv=mv, temperature=0.2)
  np.testing.assert_allclose(float(value), want, rtol=2e-5)
  one = jax.grad(lambda e: losses.supcon(as_set(e, ql), as_set(m, ml, mv), temperature=0.2))(
    jnp.asarray(q)
  )
  np.testing.assert_allclose(np.asarray(grad), np.asarray(one), rtol=2e-5, atol=1e-6)
