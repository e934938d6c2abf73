"""Head re-projection of a feature memory, against a NumPy linear + L2 norm.

Oracles: the head written out in float64 NumPy on the stored features; the
bfloat16 rounding bound of `embeddings`' docstring computed in NumPy; the
one-device projection for the memory sharded over 8 fake CPU devices; the
default forward of a tiny CNN for `head_projection`; byte counts by hand.
Cheap: small compiles only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from xbm_jax import memory, models
from xbm_jax.freshness import reprojection
from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.embeddings import Embeddings

F, D = 24, 6  # feature and embedding dims
N = 8  # devices
AX = "data"


def _head(rng):
  return {
    "kernel": jnp.asarray(rng.normal(size=(F, D)) * np.sqrt(2 / D), jnp.float32),
    "bias": jnp.asarray(rng.normal(size=(D,)) * 0.1, jnp.float32),
  }


def _project(head):
  """A linear head + L2 norm in JAX (float32), as EmbeddingHead.project computes it."""

  def project(x):
    z = x.astype(jnp.float32) @ head["kernel"] + head["bias"]
    return z / jnp.linalg.norm(z, axis=1, keepdims=True)

  return project


def _numpy_head(features, head):
  z = np.asarray(features, np.float64) @ np.asarray(head["kernel"], np.float64)
  z += np.asarray(head["bias"], np.float64)
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def _features(rng, n):
  """Non-negative pooled features (post-ReLU), of varied scale."""
  return np.abs(rng.normal(size=(n, F)) * rng.uniform(0.2, 5.0, size=(n, 1))).astype(np.float32)


def _filled(rng, *, size, written, dtype=jnp.float32):
  mem = reprojection.init(size=size, feature_dim=F, dtype=dtype)
  feats = _features(rng, written)
  labels = jnp.asarray(rng.integers(0, 4, size=written), jnp.int32)
  return memory.enqueue(mem, Embeddings(jnp.asarray(feats), labels)), feats


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.mark.slow
def test_reprojection_equals_the_head_on_the_stored_features(rng):
  head = _head(rng)
  mem, feats = _filled(rng, size=16, written=11)
  out = jax.jit(lambda m: reprojection.embeddings(m, _project(head)))(mem)
  assert out.emb.shape == (16, D) and out.emb.dtype == jnp.float32
  np.testing.assert_allclose(out.emb[:11], _numpy_head(feats, head), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.emb[11:], 0.0)  # never written
  for name in ("labels", "valid", "ptr"):
    np.testing.assert_array_equal(getattr(out, name), getattr(mem, name))
  # a new head re-embeds the same stored rows: the head's drift is gone
  head2 = _head(rng)
  out2 = reprojection.embeddings(mem, _project(head2))
  np.testing.assert_allclose(out2.emb[:11], _numpy_head(feats, head2), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_chunked_projection_equals_all_rows_at_once(rng):
  head = _head(rng)
  mem, _ = _filled(rng, size=10, written=10)
  whole = reprojection.embeddings(mem, _project(head))
  for chunk in (1, 3, 4, 10, 64):  # 3 and 4 leave a padded last chunk
    part = jax.jit(lambda m, c=chunk: reprojection.embeddings(m, _project(head), chunk_rows=c))(mem)
    np.testing.assert_allclose(part.emb, whole.emb, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_bfloat16_storage_is_within_its_rounding_bound(rng):
  head = _head(rng)
  mem, feats = _filled(rng, size=64, written=64, dtype=jnp.bfloat16)
  assert mem.emb.dtype == jnp.bfloat16
  out = np.asarray(reprojection.embeddings(mem, _project(head)).emb, np.float64)
  exact = _numpy_head(feats, head)
  kernel = np.asarray(head["kernel"], np.float64)
  z = feats.astype(np.float64) @ kernel + np.asarray(head["bias"], np.float64)
  dz = 2.0**-8 * np.abs(feats.astype(np.float64)) @ np.abs(kernel)
  bound = 2 * np.linalg.norm(dz, axis=1) / np.linalg.norm(z, axis=1) + 1e-5  # + f32 matmul
  error = np.linalg.norm(out - exact, axis=1)
  assert np.all(error <= bound), (error / bound).max()
  assert np.any(error > 1e-5)  # the rounding is there: a float32 memory would be ~1e-7
  assert np.median(bound) < 0.1  # and the bound says something


@pytest.mark.slow
def test_gradient_reaches_the_head_only_when_not_detached(rng):
  head = _head(rng)
  mem, _ = _filled(rng, size=8, written=8)

  def total(h, detach):
    return jnp.sum(reprojection.embeddings(mem, _project(h), detach=detach).emb[:, 0])

  grad = jax.grad(total)(head, False)
  assert np.abs(np.asarray(grad["kernel"])).max() > 0
  assert not np.any(np.asarray(jax.grad(total)(head, True)["kernel"]))
  # in chunks (the last one overlapping), the same gradient
  chunked = lambda h: jnp.sum(
    reprojection.embeddings(mem, _project(h), chunk_rows=3, detach=False).emb[:, 0]
  )
  np.testing.assert_allclose(
    jax.grad(chunked)(head)["kernel"], grad["kernel"], rtol=1e-5, atol=1e-7
  )


def test_sharded_memory_projects_each_shard_and_equals_one_device(rng):
  assert jax.device_count() == N, "conftest must provide 8 fake CPU devices"
  mesh = jax.make_mesh((N,), (AX,))
  head = _head(rng)
  size, local_batch = 32, 2  # 4 rows per shard; two local batches fill it
  mem = reprojection.init(size=size, feature_dim=F, dtype=jnp.bfloat16, n_shards=N, mesh=mesh)
  spec = sharded_memory.specs(AX)
  enqueue = jax.jit(
    jax.shard_map(sharded_memory.enqueue_local, mesh=mesh, in_specs=(spec, P(AX)), out_specs=spec)
  )
  for _ in range(3):  # wraps: each shard keeps its own last 4 rows
    batch = Embeddings(
      jnp.asarray(_features(rng, N * local_batch)),
      jnp.asarray(rng.integers(0, 4, size=N * local_batch), jnp.int32),
    )
    mem = enqueue(mem, jax.device_put(batch, NamedSharding(mesh, P(AX))))
  project = jax.jit(
    jax.shard_map(
      lambda m, h: reprojection.embeddings(m, _project(h), chunk_rows=3),
      mesh=mesh,
      in_specs=(spec, P()),
      out_specs=spec,
    )
  )
  head_on_mesh = jax.device_put(head, NamedSharding(mesh, P()))
  out = project(mem, head_on_mesh)
  assert "all-gather" not in project.lower(mem, head_on_mesh).compile().as_text()
  one = reprojection.embeddings(
    jax.device_get(mem)._replace(ptr=jnp.zeros((), jnp.int32)), _project(head)
  )
  np.testing.assert_allclose(out.emb, one.emb, rtol=1e-6, atol=1e-7)
  stored = np.asarray(mem.emb.astype(jnp.float32))
  np.testing.assert_allclose(out.emb, _numpy_head(stored, head), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.labels, mem.labels)


@pytest.mark.slow
def test_head_projection_of_a_model_equals_its_forward():
  model = models.create({"name": "small_cnn", "embed_dim": 8, "width": 4})
  variables = models.init_variables(model, jax.random.key(0), image_size=16, channels=1)
  images = jax.random.randint(jax.random.key(1), (5, 16, 16, 1), 0, 256).astype(jnp.uint8)
  pooled, emb = model.apply(variables, images, method="features_and_embeddings")
  mem = reprojection.init(size=8, feature_dim=pooled.shape[1], dtype="float32")
  mem = memory.enqueue(mem, Embeddings(pooled, jnp.arange(5, dtype=jnp.int32)))
  head = reprojection.head_projection(model, variables["params"])
  out = reprojection.embeddings(mem, head)
  np.testing.assert_allclose(out.emb[:5], emb, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.emb[:5], model.apply(variables, images), rtol=1e-6, atol=1e-6)


def test_bytes_by_hand_and_a_budget_that_does_not_fit():
  cost = reprojection.memory_bytes(size=55_000, feature_dim=2048, embed_dim=128, chunk_rows=4096)
  assert cost == (55_000, 55_000 * 2048 * 2, 55_000 * 128 * 4, 4096 * 2048 * 4, cost.total)
  assert cost.total == cost.stored + cost.projected + cost.upcast
  f32 = reprojection.memory_bytes(size=64, feature_dim=8, embed_dim=4, dtype="float32", n_shards=8)
  assert f32 == (8, 8 * 8 * 4, 8 * 4 * 4, 0, 8 * 8 * 4 + 8 * 4 * 4)
  sizes = dict(size=55_000, feature_dim=2048, embed_dim=128, n_shards=1)
  big = reprojection.memory_bytes(**sizes)  # no chunks: the whole upcast
  assert big.upcast == 55_000 * 2048 * 4
  assert reprojection.check_fits(budget_bytes=big.total, **sizes) == big
  with pytest.raises(ValueError, match=r"55,000 rows x 2048 features x 2 bytes \(bfloat16\)") as e:
    reprojection.check_fits(budget_bytes=big.total - 1, **sizes)
  assert "\n" not in str(e.value) and f"{big.total - 1:,} bytes" in str(e.value)


@pytest.mark.slow
def test_bad_shapes_and_dtypes_are_refused(rng):
  for bad in ("float16", jnp.int32, "complex64"):
    with pytest.raises(TypeError, match="feature memory dtype must be one of"):
      reprojection.init(size=8, feature_dim=F, dtype=bad)
  with pytest.raises(ValueError, match="feature_dim must be positive"):
    reprojection.init(size=8, feature_dim=0)
  with pytest.raises(ValueError, match="divisible"):
    reprojection.init(size=10, feature_dim=F, n_shards=N)
  head = _head(rng)
  mem, _ = _filled(rng, size=8, written=4)
  with pytest.raises(ValueError, match="chunk_rows must be positive"):
    reprojection.embeddings(mem, _project(head), chunk_rows=0)
  with pytest.raises(ValueError, match=r"project must map \[8, 24\] features to \[8, D\]"):
    reprojection.embeddings(mem, lambda x: _project(head)(x)[0])
  with pytest.raises(ValueError, match=r"feature memory must be \[k, F\] float"):
    reprojection.embeddings(mem._replace(emb=mem.emb[:, :, None]), _project(head))
  with pytest.raises(ValueError, match="batch dim 5 does not match memory dim 24"):
    memory.enqueue(mem, Embeddings(jnp.zeros((2, 5)), jnp.zeros((2,), jnp.int32)))
  with pytest.raises(ValueError, match="must be positive"):
    reprojection.memory_bytes(size=8, feature_dim=F, embed_dim=0)
