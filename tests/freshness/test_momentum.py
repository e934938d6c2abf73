"""The momentum (key) encoder against a by-hand NumPy loop.

Oracles: the EMA recurrence written out in float64 NumPy, step by step; the
inputs themselves for momentum 0 (a copy) and 1 (frozen); the stored
statistics equal to those passed for MoCo's `bn="own"`. One small model test
runs the key forward of a tiny CNN. Cheap: a few small compiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xbm_jax import models
from xbm_jax.freshness import momentum as mom


def _tree(rng, scale=1.0):
  """Flax-shaped params and BatchNorm statistics of a toy model."""
  params = {
    "backbone": {"conv0": {"kernel": rng.normal(size=(3, 3, 2, 4))}},
    "head": {"fc": {"kernel": rng.normal(size=(4, 5)), "bias": rng.normal(size=(5,))}},
  }
  stats = {"backbone": {"bn0": {"mean": rng.normal(size=(4,)), "var": rng.uniform(size=(4,))}}}
  as32 = lambda t: jax.tree.map(lambda x: jnp.asarray(scale * x, jnp.float32), t)
  return as32(params), as32(stats)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def _assert_tree_close(got, want, **tol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), **tol)


def test_ema_after_n_steps_equals_a_hand_loop(rng):
  m = 0.9
  params, stats = _tree(rng)
  ema = mom.init(params, stats)
  hand_p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  hand_s = jax.tree.map(lambda x: np.asarray(x, np.float64), stats)
  step = jax.jit(mom.update, static_argnames="bn")
  for _ in range(6):
    params, stats = _tree(rng)  # the query encoder after another optimiser step
    ema = step(ema, params, stats, momentum=m, bn="ema")
    hand_p = jax.tree.map(lambda k, q: m * k + (1 - m) * np.asarray(q, np.float64), hand_p, params)
    hand_s = jax.tree.map(lambda k, q: m * k + (1 - m) * np.asarray(q, np.float64), hand_s, stats)
  _assert_tree_close(ema.params, hand_p, rtol=1e-5, atol=1e-6)
  _assert_tree_close(ema.batch_stats, hand_s, rtol=1e-5, atol=1e-6)
  assert int(ema.steps) == 6
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((ema.params, ema.batch_stats)))


def test_moco_rule_stores_the_key_encoders_own_statistics(rng):
  params, stats = _tree(rng)
  ema = mom.init(params, stats)
  new_params, key_stats = _tree(rng)
  out = mom.update(ema, new_params, key_stats, momentum=0.99)
  _assert_tree_close(out.batch_stats, key_stats, rtol=0, atol=0)
  want = jax.tree.map(
    lambda k, q: 0.99 * np.asarray(k, np.float64) + 0.01 * np.asarray(q), params, new_params
  )
  _assert_tree_close(out.params, want, rtol=1e-6, atol=1e-7)
  kept = mom.update(ema, new_params, momentum=0.99)  # no statistics: the stored ones stay
  _assert_tree_close(kept.batch_stats, stats, rtol=0, atol=0)


def test_momentum_0_copies_and_1_freezes(rng):
  params, stats = _tree(rng)
  ema = mom.init(params, stats)
  new_params, new_stats = _tree(rng, scale=3.0)
  copied = mom.update(ema, new_params, new_stats, momentum=0.0, bn="ema")
  _assert_tree_close(copied.params, new_params, rtol=0, atol=0)
  _assert_tree_close(copied.batch_stats, new_stats, rtol=0, atol=0)
  frozen = mom.update(ema, new_params, new_stats, momentum=1.0, bn="ema")
  _assert_tree_close(frozen.params, params, rtol=0, atol=0)
  _assert_tree_close(frozen.batch_stats, stats, rtol=0, atol=0)


def test_traced_momentum_equals_the_python_float(rng):
  params, stats = _tree(rng)
  ema = mom.init(params, stats)
  new_params, _ = _tree(rng)
  traced = jax.jit(lambda e, p, m: mom.update(e, p, momentum=m))(ema, new_params, 0.75)
  _assert_tree_close(traced.params, mom.update(ema, new_params, momentum=0.75).params, rtol=1e-7)


def test_init_copies_the_buffers(rng):
  params, stats = _tree(rng)
  ema = mom.init(params, stats)
  for got, src in zip(jax.tree.leaves(ema.params), jax.tree.leaves(params)):
    assert got is not src and got.unsafe_buffer_pointer() != src.unsafe_buffer_pointer()
    np.testing.assert_array_equal(got, src)
  assert mom.init(params).batch_stats == {}


def test_bad_arguments_are_refused(rng):
  params, stats = _tree(rng)
  ema = mom.init(params, stats)
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError, match="momentum must be in"):
      mom.update(ema, params, stats, momentum=bad)
  with pytest.raises(ValueError, match="bn must be one of"):
    mom.update(ema, params, stats, momentum=0.9, bn="copy")
  with pytest.raises(ValueError, match="bn=.ema. needs"):
    mom.update(ema, params, momentum=0.9, bn="ema")
  with pytest.raises(ValueError, match="params do not match"):
    mom.update(ema, {"head": params["head"]}, stats, momentum=0.9)
  short = jax.tree.map(lambda x: x, params)
  short["head"]["fc"]["bias"] = jnp.zeros((4,), jnp.float32)
  with pytest.raises(ValueError, match=r"params\['head'\]\['fc'\]\['bias'\] has shape \(4,\)"):
    mom.update(ema, short, stats, momentum=0.9)
  with pytest.raises(TypeError, match="must be a float array"):
    mom.init({"w": jnp.zeros((2,), jnp.int32)})


@pytest.mark.slow
def test_key_forward_of_a_small_model_and_its_update():
  model = models.create({"name": "small_cnn", "embed_dim": 8, "width": 4})
  variables = models.init_variables(model, jax.random.key(0), image_size=16, channels=1)
  ema = mom.init(variables["params"], variables["batch_stats"])
  images = jax.random.randint(jax.random.key(1), (6, 16, 16, 1), 0, 256).astype(jnp.uint8)
  key_emb, upd = model.apply(mom.variables(ema), images, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(np.linalg.norm(np.asarray(key_emb), axis=1), 1.0, rtol=1e-5)
  moved = jax.tree.map(lambda x: x + 1.0, variables["params"])
  out = mom.update(ema, moved, upd["batch_stats"], momentum=0.5)
  _assert_tree_close(out.batch_stats, upd["batch_stats"], rtol=0, atol=0)
  want = jax.tree.map(lambda x: np.asarray(x, np.float64) + 0.5, variables["params"])
  _assert_tree_close(out.params, want, rtol=1e-6, atol=1e-6)


def test_update_inside_shard_map_on_8_devices_equals_one_device(rng):
  assert jax.device_count() == 8, "conftest must provide 8 fake CPU devices"
  mesh = jax.make_mesh((8,), ("data",))
  params, stats = _tree(rng)
  ema = mom.init(params, stats)
  new_params, new_stats = _tree(rng)
  replicated = jax.sharding.PartitionSpec()
  on_mesh = jax.jit(
    jax.shard_map(
      lambda e, p, s: mom.update(e, p, s, momentum=0.9, bn="ema"),
      mesh=mesh,
      in_specs=replicated,
      out_specs=replicated,
    )
  )
  put = lambda t: jax.device_put(t, jax.sharding.NamedSharding(mesh, replicated))
  got = on_mesh(put(ema), put(new_params), put(new_stats))
  want = mom.update(ema, new_params, new_stats, momentum=0.9, bn="ema")
  _assert_tree_close(got, want, rtol=1e-6, atol=1e-7)  # jit may fuse a multiply-add
