"""A user's pair loss written once (xbm_jax.losses.pairs), against a NumPy loop over pairs:
on one device (value, and gradient against central differences), and on 8 fake
devices against a replicated and a sharded memory (value and gradient equal to
one device, "paper" and "mean", with padding rows spread unevenly)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.helpers import loss_oracles as oracle
from xbm_jax import losses, memory
from xbm_jax.losses import pairs
from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.embeddings import Embeddings
from tests.helpers.custom_losses import margin_rank_row, margin_rank_rows
from tests.helpers.sets import as_set, unit


FORMS = {"pair_loss": margin_rank_row, "reduction_loss": margin_rank_rows}


@pytest.mark.parametrize("reduction", ["paper", "mean"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_user_loss_matches_numpy_loop_value_and_gradient(form, reduction):
  rng = np.random.default_rng(0)
  q, ql, qv = unit(rng, 6, 3), rng.integers(0, 3, 6).astype(np.int32), rng.random(6) < 0.85
  r, rl, rv = unit(rng, 14, 3), rng.integers(0, 3, 14).astype(np.int32), rng.random(14) < 0.8
  r[:2], rl[:2] = q[:2], ql[:2]  # the anchors' own copies: the self rule drops them
  fn = FORMS[form]
  want = oracle.margin_rank(q, ql, r, rl, qv, rv, margin=0.3, reduction=reduction)
  got = fn(as_set(q, ql, qv), as_set(r, rl, rv), margin=0.3, reduction=reduction)
  np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=2e-6)
  assert want > 0
  with jax.enable_x64(True):
    g = jax.grad(
      lambda e: fn(as_set(e, ql, qv), as_set(r, rl, rv), margin=0.3, reduction=reduction)
    )(jnp.asarray(q, jnp.float64))
  h, q64 = 1e-6, q.astype(np.float64)
  for i, k in [(0, 0), (1, 2), (3, 1), (5, 0), (4, 2)]:
    up, down = q64.copy(), q64.copy()
    up[i, k] += h
    down[i, k] -= h
    fd = (
      oracle.margin_rank(up, ql, r, rl, qv, rv, margin=0.3, reduction=reduction)
      - oracle.margin_rank(down, ql, r, rl, qv, rv, margin=0.3, reduction=reduction)
    ) / (2 * h)
    np.testing.assert_allclose(g[i, k], fd, rtol=1e-4, atol=1e-6, err_msg=f"entry {(i, k)}")


N, B, D, SIZE, AX = 8, 2, 4, 32, "data"


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((N,), (AX,))


def _data(seed=1):
  rng = np.random.default_rng(seed)
  q, ql = unit(rng, N * B, D), rng.integers(0, 3, N * B).astype(np.int32)
  qv = np.ones(N * B, bool)
  qv[[0, 1, 6]] = False  # device 0 has no valid anchor, device 3 one
  m, ml, mv = unit(rng, SIZE, D), rng.integers(0, 3, SIZE).astype(np.int32), rng.random(SIZE) < 0.8
  m[5], ml[5] = q[4], ql[4]  # an anchor's own copy in the memory
  return q, ql, qv, m, ml, mv


def _data_parallel(mesh, fn, kw, sharded):
  """jit(value, grad) of the mean over devices of each device's loss of its anchors
  against the memory (replicated, or rows split over the devices)."""
  mem_spec = sharded_memory.specs(AX) if sharded else memory.MemoryState(P(), P(), P(), P())

  def body(e, l, v, mem):
    extra = {"axis_name": AX} if sharded else {}
    value = fn(Embeddings(e, l, v), mem, data_axis=AX, **extra, **kw)
    return jax.lax.pmean(value, AX)

  run = jax.shard_map(body, mesh=mesh, in_specs=(P(AX), P(AX), P(AX), mem_spec), out_specs=P())
  return jax.jit(jax.value_and_grad(run))


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "sharded"])
@pytest.mark.parametrize("reduction", ["paper", "mean"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_user_loss_on_eight_devices_equals_one(mesh, form, reduction, sharded):
  q, ql, qv, m, ml, mv = _data()
  fn, kw = FORMS[form], {"margin": 0.3, "reduction": reduction}
  mem = memory.MemoryState(jnp.asarray(m), jnp.asarray(ml), jnp.asarray(mv), jnp.int32(0))
  if sharded:
    mem = sharded_memory.put(mem._replace(ptr=jnp.zeros((N,), jnp.int32)), mesh)
  else:
    mem = jax.device_put(mem, NamedSharding(mesh, P()))
  split = NamedSharding(mesh, P(AX))
  args = [jax.device_put(jnp.asarray(x), split) for x in (q, ql, qv)]
  value, grad = _data_parallel(mesh, fn, kw, sharded)(*args, mem)
  want = oracle.margin_rank(q, ql, m, ml, qv, mv, margin=0.3, reduction=reduction)
  np.testing.assert_allclose(float(value), want, rtol=2e-5, atol=2e-6)
  one = jax.grad(lambda e: fn(as_set(e, ql, qv), as_set(m, ml, mv), **kw))(jnp.asarray(q))
  np.testing.assert_allclose(np.asarray(grad), np.asarray(one), rtol=2e-5, atol=1e-6)
  assert np.any(np.asarray(one) != 0)


def test_plain_function_works_with_the_replicated_memory():
  """A plain f(query, reference) -> [] gets the memory through the one-call path."""

  def plain(query, reference, *, scale=1.0):
    return scale * jnp.mean(losses.similarity(query, reference))

  rng = np.random.default_rng(2)
  b = as_set(unit(rng, 8, 4), rng.integers(0, 3, 8).astype(np.int32))
  mem = memory.enqueue(memory.init(size=16, dim=4), as_set(unit(rng, 8, 4), np.arange(8)))
  total, new, aux = losses.xbm_total_loss(
    b, b, mem, step=1, start_step=0, loss=plain, scale=2.0, weight=0.5
  )
  full = memory.enqueue(mem, b)
  want = 2 * np.mean(np.asarray(b.emb) @ np.asarray(b.emb).T) + 0.5 * 2 * np.mean(
    np.asarray(b.emb) @ np.asarray(full.emb).T
  )
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  assert int(new.ptr) == 0 and bool(new.valid.all())


def test_built_in_losses_are_pair_losses_with_checked_options():
  assert all(pairs.is_pair_loss(fn) for fn in losses.LOSSES.values())
  b = as_set(unit(np.random.default_rng(3), 4, 4), np.arange(4) % 2)
  with pytest.raises(TypeError, match="'margn'"):
    losses.contrastive(b, b, margn=0.3)
  with pytest.raises(TypeError, match="'beta'"):
    losses.xbm_total_loss(b, b, memory.init(size=8, dim=4), step=0, start_step=0, beta=3.0)
  with pytest.raises(TypeError, match="'temperature'"):
    losses.check_loss_options(
      "tests.helpers.custom_losses:margin_rank_row", ["margin", "temperature"]
    )
  assert losses.resolve("tests.helpers.custom_losses:margin_rank_rows") is margin_rank_rows
  with pytest.raises(ValueError, match="no function 'nope'"):
    losses.resolve("tests.helpers.custom_losses:nope")


def test_bad_user_losses_are_clear_errors():
  with pytest.raises(TypeError, match=r"wrong must have the signature \(sim, pos, neg"):

    @pairs.pair_loss
    def wrong(sim, pos):
      return jnp.sum(sim)

  with pytest.raises(TypeError, match="library's own options"):

    @pairs.reduction_loss
    def clash(rows, *, reduction="sum"):
      return rows.sum(rows.sim, rows.pos)

  def two_args_only(query):
    return jnp.float32(0)

  with pytest.raises(TypeError, match=r"cannot be called as two_args_only\(query, reference\)"):
    losses.check_loss_options(two_args_only, [])

  @pairs.pair_loss
  def no_count(sim, pos, neg):
    return jnp.sum(jnp.where(pos, 1 - sim, 0.0))

  b = as_set(unit(np.random.default_rng(4), 4, 4), np.arange(4) % 2)
  with pytest.raises(ValueError, match="reduction='mean' needs pair loss no_count"):
    no_count(b, b, reduction="mean")
  plain = lambda query, reference: jnp.float32(0)
  with pytest.raises(TypeError, match="plain function: a sharded memory"):
    losses.xbm_total_loss(
      b, b, memory.init(size=8, dim=4), step=0, start_step=0, loss=plain, axis_name=AX
    )
