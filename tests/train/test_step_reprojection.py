"""The train step with head re-projection (`reprojection=True`): the memory stores
pooled features and the memory term sees them through the current head."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import loss_oracles
from tests.helpers.steps import ctrl_of, make_batches, optim_cfg, xbm_of
from xbm_jax import memory, parallel
from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.models.head import EmbeddingHead
from xbm_jax.train import optim, state as state_lib, step as step_lib
import pytest

FEATURES = 12  # F, the pooled features' width (the head maps F -> 8)


class TinyBackboneAndHead(nn.Module):
  """Dense -> BN (across `data`) -> relu as the "backbone" (pooled features
  `[B, 12]`), then the library's EmbeddingHead (Dense -> L2), with the entry points
  of `xbm_jax.models.EmbeddingModel` the re-projection uses."""

  def setup(self):
    self.body = nn.Dense(FEATURES, use_bias=False)
    self.bn = nn.BatchNorm(axis_name=parallel.DATA_AXIS, momentum=0.9)
    self.head = EmbeddingHead(embed_dim=8)

  def features(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
    return nn.relu(self.bn(self.body(x), use_running_average=not train))

  def __call__(self, x, train: bool = False):
    return self.head.project(self.features(x, train))

  def features_and_embeddings(self, x, train: bool = False):
    pooled = self.features(x, train)
    return pooled, self.head.project(pooled)

  def project_features(self, pooled):
    return self.head.project(pooled)


def _build(mesh, batch, mem, *, sharded=False, opt="adam", **step_kw):
  model = TinyBackboneAndHead()
  variables = jax.device_get(model.init(jax.random.PRNGKey(0), batch["image"][:2], train=False))
  direction = optim.make_direction(optim_cfg(name=opt))
  st = state_lib.create(
    params=variables["params"], batch_stats=variables["batch_stats"], tx=direction, memory=mem
  )
  st = jax.device_put(st, step_lib.state_shardings(st, mesh, sharded_memory=sharded))
  fn = step_lib.make_train_step(
    model=model,
    direction=direction,
    schedule=optim.make_schedule(optim_cfg(), 10),
    xbm=xbm_of(mem, sharded=sharded),
    mesh=mesh,
    **step_kw,
  )
  return model, variables, st, fn


def _train_features(model, variables, images):
  """`([B, F] pooled, [B, D] embeddings)` in train mode on one device."""
  (pooled, emb), _ = jax.vmap(
    lambda v: model.apply(
      v, jnp.asarray(images), train=True, mutable=["batch_stats"], method="features_and_embeddings"
    ),
    axis_name=parallel.DATA_AXIS,
    in_axes=None,
    out_axes=None,
    axis_size=1,
  )(variables)
  return np.asarray(pooled, np.float64), np.asarray(emb, np.float64)


def _stale_features(rng, rows=24, size=40):
  """A float32 feature memory `[size, F]` with `rows` stale entries (ptr at `rows`)."""
  feats = np.abs(rng.normal(size=(rows, FEATURES))).astype(np.float32)
  labels = rng.integers(0, 10, size=rows).astype(np.int32)
  mem = memory.init(size=size, dim=FEATURES)
  return memory.enqueue(mem, _emb(feats, labels)), feats, labels


def _emb(x, labels):
  from xbm_jax.embeddings import Embeddings  # pylint: disable=g-import-not-at-top

  return Embeddings(jnp.asarray(x), jnp.asarray(labels))


@pytest.mark.slow
def test_reprojection_step_matches_numpy_and_a_stale_memory_of_the_projected_rows():
  """One step, memory on from step 0, 24 stale feature rows: the memory then holds
  the stale features and the batch's pooled features after them; the memory term is
  the NumPy pair loop over those rows through the head in NumPy (f W + b, L2 norm).
  The updated params equal the reference step's on a memory holding those projected
  rows as constants: no gradient reaches the head through the memory's rows."""
  (batch,) = make_batches(1, seed=11)
  mesh = parallel.make_mesh(1)
  mem, stale, stale_labels = _stale_features(np.random.default_rng(2))
  # SGD: its update is proportional to the gradient (Adam's first is its sign).
  model, variables, st, fn = _build(mesh, batch, mem, opt="sgd", reprojection=True)
  pooled, emb = _train_features(model, variables, batch["image"])
  new, m = jax.device_get(fn(st, parallel.global_batch(batch, mesh), ctrl_of(0)))

  want_feats = np.concatenate([stale, pooled])
  want_labels = np.concatenate([stale_labels, batch["label"]])
  np.testing.assert_allclose(new.memory.emb[:40], want_feats, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(new.memory.labels, want_labels)
  assert int(new.memory.ptr) == 0 and new.memory.emb.shape == (40, FEATURES)

  fc = variables["params"]["head"]["fc"]
  z = want_feats @ np.asarray(fc["kernel"], np.float64) + np.asarray(fc["bias"], np.float64)
  projected = z / np.linalg.norm(z, axis=1, keepdims=True)
  want_xbm = loss_oracles.contrastive(emb, batch["label"], projected, want_labels)
  want_batch = loss_oracles.contrastive(emb, batch["label"], emb, batch["label"])
  np.testing.assert_allclose(m["loss_xbm"], want_xbm, rtol=1e-4)
  np.testing.assert_allclose(m["loss"], want_batch + want_xbm, rtol=1e-4)

  # The reference step on the projected stale rows (the batch's own rows it enqueues
  # itself): the same loss and the same update.
  ref_mem = memory.enqueue(memory.init(size=40, dim=8), _emb(projected[:24], stale_labels))
  _, _, ref_st, ref_fn = _build(mesh, batch, ref_mem, opt="sgd")
  ref, ref_m = jax.device_get(ref_fn(ref_st, parallel.global_batch(batch, mesh), ctrl_of(0)))
  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new.params, ref.params
  )


def _sorted_rows(mem):
  table = np.column_stack([mem.labels, mem.valid, np.asarray(mem.emb, np.float32)])
  return table[np.lexsort(table.T[::-1])]


@pytest.mark.slow
def test_reprojection_one_device_equals_eight_replicated_and_sharded():
  """3 steps with re-projection (bf16 features), memory from step 0: 1 device, 8
  devices and 8 devices with the memory sharded give the same losses, parameters
  and stored feature rows."""
  batches = make_batches(3, seed=12)
  runs = []
  for n, sharded in ((1, False), (8, False), (8, True)):
    mesh = parallel.make_mesh(n)
    init = sharded_memory.init if sharded else memory.init
    shards = {"n_shards": n} if sharded else {}
    mem = init(size=64, dim=FEATURES, dtype=jnp.bfloat16, **shards)
    _, _, st, fn = _build(mesh, batches[0], mem, sharded=sharded, reprojection=True)
    history = []
    for batch in batches:
      st, m = fn(st, parallel.global_batch(batch, mesh), ctrl_of(0))
      history.append(jax.device_get(m))
    runs.append((jax.device_get(st), history))
  s1, h1 = runs[0]
  assert s1.memory.emb.dtype == jnp.bfloat16 and int(s1.memory.valid.sum()) == 48
  for st, history in runs[1:]:
    for a, b in zip(h1, history):
      for k in ("loss", "loss_xbm", "xbm/mean_pos_sim"):
        np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=1e-6, err_msg=k)
    jax.tree.map(
      lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5), s1.params, st.params
    )
    np.testing.assert_allclose(_sorted_rows(st.memory), _sorted_rows(s1.memory), atol=1e-2)
