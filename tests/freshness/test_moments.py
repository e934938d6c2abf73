"""Moment matching of the memory (drift correction), against NumPy oracles.

Oracles: NumPy mean/var over the valid rows (float64), the formula applied row
by row in NumPy, a hand loop for the moving average, and the one-device result
for the memory sharded over 8 fake CPU devices. Cheap: a few small compiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from xbm_jax.freshness import moments as dc
from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.memory import MemoryState

D = 6
N = 8  # devices
SIZE = 32  # 4 rows per shard
AX = "data"


def _memory(rng, valid, *, offset=0.0):
  """A memory of unit rows (plus an offset, so its moments differ from a batch's)."""
  emb = rng.normal(size=(len(valid), D)) + offset
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  return MemoryState(
    emb=jnp.asarray(emb, jnp.float32),
    labels=jnp.asarray(rng.integers(0, 5, size=len(valid)), jnp.int32),
    valid=jnp.asarray(valid),
    ptr=jnp.zeros((), jnp.int32),
  )


def _batch_moments(rng, n=16):
  x = rng.normal(size=(n, D)) * rng.uniform(0.5, 2.0, size=D) + rng.normal(size=D)
  return x.mean(0).astype(np.float32), x.var(0).astype(np.float32)


def _oracle(emb, valid, mean_b, var_b, *, eps=1e-6, renormalize=True):
  """The formula in float64 NumPy on the valid rows; invalid rows as they were."""
  emb = np.asarray(emb, np.float64)
  rows = emb[valid]
  mean_m, var_m = rows.mean(0), rows.var(0)
  out = np.sqrt(var_b) * (rows - mean_m) / np.sqrt(np.maximum(var_m, eps)) + mean_b
  if renormalize:
    out /= np.linalg.norm(out, axis=1, keepdims=True)
  result = emb.copy()
  result[valid] = out
  return result


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def test_moments_equal_numpy_over_valid_rows(rng):
  valid = rng.random(20) < 0.6
  emb = rng.normal(size=(20, D)).astype(np.float32) + 3.0  # an offset tests the two passes
  mean, var, count = dc.moments(jnp.asarray(emb), jnp.asarray(valid))
  np.testing.assert_allclose(mean, emb[valid].astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(var, emb[valid].astype(np.float64).var(0), rtol=1e-5, atol=1e-6)
  assert float(count) == valid.sum()
  mean, var, count = dc.moments(jnp.asarray(emb), jnp.zeros(20, bool))
  assert float(count) == 0 and not np.any(mean) and not np.any(var)


def test_matched_memory_has_the_batch_moments_and_invalid_rows_stay(rng):
  valid = rng.random(24) < 0.7
  mem = _memory(rng, valid, offset=0.5)
  mean_b, var_b = _batch_moments(rng)
  out = jax.jit(dc.match_moments, static_argnames="renormalize")(
    mem, mean_b, var_b, renormalize=False
  )
  rows = np.asarray(out.emb, np.float64)[valid]
  np.testing.assert_allclose(rows.mean(0), mean_b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(rows.var(0), var_b, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
    out.emb, _oracle(mem.emb, valid, mean_b, var_b, renormalize=False), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_array_equal(np.asarray(out.emb)[~valid], np.asarray(mem.emb)[~valid])
  for name in ("labels", "valid", "ptr"):
    np.testing.assert_array_equal(getattr(out, name), getattr(mem, name))


def test_renormalised_rows_are_unit_and_equal_numpy(rng):
  valid = rng.random(24) < 0.7
  mem = _memory(rng, valid, offset=0.5)
  mean_b, var_b = _batch_moments(rng)
  out = jax.jit(dc.match_moments)(mem, mean_b, var_b)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out.emb)[valid], axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(out.emb, _oracle(mem.emb, valid, mean_b, var_b), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.emb)[~valid], np.asarray(mem.emb)[~valid])


def test_empty_memory_is_unchanged_and_constant_dimension_gives_no_nan(rng):
  mean_b, var_b = _batch_moments(rng)
  empty = _memory(rng, np.zeros(8, bool))
  out = dc.match_moments(empty, mean_b, var_b)
  np.testing.assert_array_equal(out.emb, empty.emb)
  valid = np.ones(8, bool)
  emb = np.array(_memory(rng, valid).emb)
  emb[:, 2] = 0.25  # the memory is constant along dimension 2
  mem = _memory(rng, valid)._replace(emb=jnp.asarray(emb))
  out = dc.match_moments(mem, mean_b, var_b, renormalize=False)
  assert np.isfinite(np.asarray(out.emb)).all()
  np.testing.assert_allclose(np.asarray(out.emb)[:, 2], mean_b[2], rtol=1e-6)
  np.testing.assert_allclose(
    out.emb, _oracle(emb, valid, mean_b, var_b, renormalize=False), rtol=1e-5, atol=1e-5
  )


@pytest.mark.slow
def test_bfloat16_memory_keeps_its_dtype(rng):
  valid = np.ones(16, bool)
  mem = _memory(rng, valid)
  mem = mem._replace(emb=mem.emb.astype(jnp.bfloat16))
  mean_b, var_b = _batch_moments(rng)
  out = dc.match_moments(mem, mean_b, var_b)
  assert out.emb.dtype == jnp.bfloat16
  want = _oracle(np.asarray(mem.emb.astype(jnp.float32)), valid, mean_b, var_b)
  np.testing.assert_allclose(np.asarray(out.emb, np.float32), want, atol=1e-2)


def test_ema_after_n_steps_equals_a_hand_loop(rng):
  decay = 0.8
  state = dc.init(D)
  step = jax.jit(dc.update)
  hand_mean = hand_var = None
  for _ in range(5):
    mean_b, var_b = _batch_moments(rng)
    state = step(state, mean_b, var_b, decay=decay)
    if hand_mean is None:
      hand_mean, hand_var = mean_b.astype(np.float64), var_b.astype(np.float64)
    else:
      hand_mean = decay * hand_mean + (1 - decay) * mean_b
      hand_var = decay * hand_var + (1 - decay) * var_b
  np.testing.assert_allclose(state.mean, hand_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(state.var, hand_var, rtol=1e-6, atol=1e-6)
  assert int(state.steps) == 5


def test_bad_shapes_raise_naming_the_argument(rng):
  mem = _memory(rng, np.ones(8, bool))
  good = np.zeros(D, np.float32)
  with pytest.raises(ValueError, match="batch_mean"):
    dc.match_moments(mem, np.zeros(D + 1, np.float32), good)
  with pytest.raises(ValueError, match="batch_var"):
    dc.match_moments(mem, good, np.zeros((1, D), np.float32))
  with pytest.raises(ValueError, match="batch_var"):
    dc.update(dc.init(D), good, np.zeros(D - 1, np.float32), decay=0.9)
  with pytest.raises(ValueError, match="decay"):
    dc.update(dc.init(D), good, good, decay=1.0)
  with pytest.raises(ValueError, match="eps"):
    dc.match_moments(mem, good, good, eps=0.0)
  with pytest.raises(ValueError, match="valid"):
    dc.moments(mem.emb, mem.valid[:4])


@pytest.mark.slow
def test_sharded_memory_equals_one_device(rng):
  assert jax.device_count() == N, "conftest must provide 8 fake CPU devices"
  mesh = jax.make_mesh((N,), (AX,))
  # Uneven valid rows per shard: 4, 0, 1, 3, 2, 4, 0, 1 of 4.
  per_shard = [4, 0, 1, 3, 2, 4, 0, 1]
  valid = np.concatenate([np.arange(4) < c for c in per_shard])
  mem = _memory(rng, valid, offset=0.5)._replace(ptr=jnp.zeros((N,), jnp.int32))
  mean_b, var_b = _batch_moments(rng)
  spec = sharded_memory.specs(AX)
  fn = jax.jit(
    jax.shard_map(
      lambda m, mu, var: (
        dc.match_moments(m, mu, var, axis_name=AX),
        dc.moments(m.emb, m.valid, axis_name=AX),
      ),
      mesh=mesh,
      in_specs=(spec, P(), P()),
      out_specs=(spec, (P(), P(), P())),
    )
  )
  replicated = NamedSharding(mesh, P())
  out, (mean_m, var_m, count) = fn(
    sharded_memory.put(mem, mesh, AX),
    jax.device_put(mean_b, replicated),
    jax.device_put(var_b, replicated),
  )
  one = dc.match_moments(mem._replace(ptr=jnp.zeros((), jnp.int32)), mean_b, var_b)
  np.testing.assert_allclose(out.emb, one.emb, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.emb, _oracle(mem.emb, valid, mean_b, var_b), rtol=1e-5, atol=1e-6)
  rows = np.asarray(mem.emb, np.float64)[valid]
  np.testing.assert_allclose(mean_m, rows.mean(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(var_m, rows.var(0), rtol=1e-5, atol=1e-7)
  assert float(count) == valid.sum()
