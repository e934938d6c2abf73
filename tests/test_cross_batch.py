"""The memory as one value (`CrossBatchMemory`) and configured losses as values
(`losses.bind`, a `functools.partial` of a built-in). Oracles: the NumPy loops of
tests/helpers/loss_oracles.py, and a memory enqueued by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import xbm_jax
from xbm_jax import losses, memory
from xbm_jax.embeddings import Embeddings
from tests.helpers import loss_oracles as oracle
from tests.helpers.sets import unit

N, B, D, SIZE, AX = 8, 2, 4, 32, "data"


def batch_and_memory(seed=0, b=12, size=24):
  rng = np.random.default_rng(seed)
  e, l = unit(rng, b, D), rng.integers(0, 4, b).astype(np.int32)
  m, ml = unit(rng, size - b, D), rng.integers(0, 4, size - b).astype(np.int32)
  mem = memory.enqueue(memory.init(size=size, dim=D), Embeddings(jnp.asarray(m), jnp.asarray(ml)))
  return (e, l), (m, ml), mem


def test_a_bound_builtin_is_the_loss_with_those_options_and_stays_a_pair_loss():
  (e, l), (m, ml), _ = batch_and_memory()
  q, r = Embeddings(jnp.asarray(e), jnp.asarray(l)), Embeddings(jnp.asarray(m), jnp.asarray(ml))
  ms = losses.bind(losses.multi_similarity, beta=10.0, lam=0.3)
  value, stats = ms(q, r, return_stats=True)
  want = oracle.multi_similarity(e, l, m, ml, beta=10.0, lam=0.3)
  np.testing.assert_allclose(float(value), want, rtol=1e-5)
  assert "pos_pairs" in stats and "neg_pairs" in stats
  assert losses.pairs.is_pair_loss(ms) and ms.options["beta"] == 10.0
  # a call still overrides a bound option
  np.testing.assert_allclose(
    float(ms(q, r, beta=40.0)), oracle.multi_similarity(e, l, m, ml, beta=40.0, lam=0.3), rtol=1e-5
  )
  # a partial of a built-in resolves to the same bound pair loss (it used to lose both)
  part = losses.resolve(functools.partial(losses.multi_similarity, beta=10.0, lam=0.3))
  assert losses.pairs.is_pair_loss(part)
  np.testing.assert_allclose(float(part(q, r)), want, rtol=1e-6)


def test_bad_bound_options_are_one_error():
  with pytest.raises(TypeError, match="takes no option 'betta'"):
    losses.bind(losses.multi_similarity, betta=10.0)
  with pytest.raises(TypeError, match="takes no option 'margin'"):
    losses.bind(lambda query, reference, *, scale=1.0: 0.0, margin=0.1)
  with pytest.raises(ValueError, match="size must be a positive int"):
    xbm_jax.CrossBatchMemory(size=0, dim=4)
  with pytest.raises(ValueError, match="dtype must be a float dtype"):
    xbm_jax.CrossBatchMemory(size=8, dim=4, dtype=jnp.int32)
  assert (
    xbm_jax.CrossBatchMemory(size=8, dim=4, dtype=jnp.bfloat16).init().emb.dtype == jnp.bfloat16
  )
  with pytest.raises(TypeError, match="takes no option 'marginn'"):
    xbm_jax.CrossBatchMemory(size=8, dim=4, memory_options={"marginn": 0.1})
  with pytest.raises(ValueError, match='self_exclusion="id" needs ids=True'):
    xbm_jax.CrossBatchMemory(size=8, dim=4, memory_options={"self_exclusion": "id"})
  with pytest.raises(TypeError, match="plain function"):
    xbm_jax.CrossBatchMemory(size=8, dim=4, loss=lambda q, r: 0.0, axis_name=AX)


@pytest.mark.parametrize("step,on", [(3, False), (5, True)])
def test_update_is_enqueue_then_batch_term_plus_weighted_memory_term(step, on):
  (e, l), _, mem = batch_and_memory(seed=1)
  xbm = xbm_jax.CrossBatchMemory(
    size=24, dim=D, loss=losses.bind(losses.contrastive, margin=0.3), weight=0.5, start_step=5
  )
  assert xbm.init().emb.shape == (24, D) and int(xbm.init().valid.sum()) == 0
  b = Embeddings(jnp.asarray(e), jnp.asarray(l))
  total, new, aux = jax.jit(lambda b, mem, t: xbm.update(b, b, mem, step=t))(b, mem, step)
  # By hand: before the start the memory is untouched and unscored; from it, the batch is
  # enqueued first (into the 12 free rows) and scored with the 12 older ones.
  full = memory.enqueue(mem, b)
  want = oracle.contrastive(e, l, e, l, margin=0.3)
  if on:
    ref = np.asarray(full.emb), np.asarray(full.labels)
    want += 0.5 * oracle.contrastive(e, l, *ref, margin=0.3)
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(new.emb), np.asarray((full if on else mem).emb))
  # a traced per-call weight (a controller's gate) overrides the bound one
  t2, _, _ = xbm.update(b, b, mem, step=5, weight=jnp.float32(0.0))
  np.testing.assert_allclose(float(t2), oracle.contrastive(e, l, e, l, margin=0.3), rtol=1e-5)


def test_sharded_update_on_eight_devices_equals_the_replicated_one():
  rng = np.random.default_rng(3)
  e, l = unit(rng, N * B, D), rng.integers(0, 3, N * B).astype(np.int32)
  mesh = jax.make_mesh((N,), (AX,))
  ms = losses.bind(losses.multi_similarity, beta=10.0)
  rep = xbm_jax.CrossBatchMemory(size=SIZE, dim=D, loss=ms, data_axis=AX)
  shd = xbm_jax.CrossBatchMemory(size=SIZE, dim=D, loss=ms, axis_name=AX, data_axis=AX)
  gather = lambda x: jax.lax.all_gather(x, AX, tiled=True)

  def run(xbm, mem_spec):
    def body(e, l, mem):
      total, mem, _ = xbm.update(Embeddings(e, l), Embeddings(gather(e), gather(l)), mem, step=0)
      return jax.lax.pmean(total, AX), mem

    spec = (P(AX), P(AX), mem_spec)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=(P(), mem_spec)))

  split = NamedSharding(mesh, P(AX))
  args = [jax.device_put(jnp.asarray(x), split) for x in (e, l)]
  rep_mem = jax.device_put(rep.init(), NamedSharding(mesh, P()))
  t_rep, m_rep = run(rep, memory.MemoryState(P(), P(), P(), P()))(*args, rep_mem)
  t_shd, m_shd = run(shd, memory.sharded.specs(AX))(*args, shd.init(mesh=mesh))
  want = oracle.multi_similarity(e, l, e, l, beta=10.0) * 2  # the memory holds the batch
  np.testing.assert_allclose(float(t_rep), want, rtol=2e-5)
  np.testing.assert_allclose(float(t_shd), want, rtol=2e-5)
  assert int(m_rep.valid.sum()) == int(m_shd.valid.sum()) == N * B
