"""The design's correctness test: one global batch on 1 and on 8 devices gives the
same loss, the same updated params, BN statistics and memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xbm_jax
from tests.helpers import loss_oracles
from xbm_jax import losses, memory, parallel
from tests.helpers.steps import build, ctrl_of, make_batches
from tests.helpers.steps import TinyEmbedder


def run_steps(
  n_devices, batches, *, loss_name="contrastive", loss_kwargs=None, start_step=1, mem_size=40
):
  mesh = parallel.make_mesh(n_devices)
  st, train_step = build(
    mesh, batches[0], loss_name=loss_name, loss_kwargs=loss_kwargs, mem_size=mem_size
  )
  history = []
  for batch in batches:
    st, metrics = train_step(st, parallel.global_batch(batch, mesh), ctrl_of(start_step))
    history.append(jax.device_get(metrics))
  return jax.device_get(st), history, train_step


def run_steps_local(local_batches):
  """Steps over all devices of all processes; each process passes its own rows."""
  mesh = parallel.make_mesh()
  st, train_step = build(mesh, local_batches[0])
  history = []
  for batch in local_batches:
    st, metrics = train_step(st, parallel.global_batch(batch, mesh), ctrl_of(1))
    history.append({k: np.asarray(v.addressable_data(0)) for k, v in metrics.items()})
  return history


@pytest.mark.parametrize(
  "loss_name,loss_kwargs",
  [
    # "mean": each device's active-pair count differs; exact only over the whole batch.
    ("contrastive", {"reduction": "mean"}),
    ("multi_similarity", {}),
    ("contrastive", {"self_exclusion": "index"}),  # "paper"
    ("multi_similarity", {"self_exclusion": "id"}),  # image ids, stored in the memory
    # a user's loss by import path, written once per anchor row (tests/losses/test_pairs.py)
    ("tests.helpers.custom_losses:margin_rank_row", {"margin": 0.3, "reduction": "mean"}),
  ],
)
def test_one_device_equals_eight(loss_name, loss_kwargs):
  batches = make_batches(4)
  s1, h1, _ = run_steps(1, batches, loss_name=loss_name, loss_kwargs=loss_kwargs)
  s8, h8, _ = run_steps(8, batches, loss_name=loss_name, loss_kwargs=loss_kwargs)
  for a, b in zip(h1, h8):
    for k in (
      "loss",
      "loss_batch",
      "loss_xbm",
      "batch/pos_pairs",
      "xbm/neg_pairs",
      "batch/mean_pos_sim",
      "batch/mean_neg_sim",
      "xbm/mean_pos_sim",
      "xbm/mean_neg_sim",
    ):  # pair-weighted across devices
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)
  for name, t1, t8 in [
    ("params", s1.params, s8.params),
    ("batch_stats", s1.batch_stats, s8.batch_stats),
    ("memory", s1.memory, s8.memory),
  ]:
    jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=name), t1, t8
    )
  assert h1[0]["xbm_weight"] == 0.0 and h1[1]["xbm_weight"] == 1.0
  assert int(s8.memory.ptr) == (3 * 16) % 40  # enqueued from step 1 on (3 steps), wrapped


def train_forward(model, variables, images):
  """`([B, D] train-mode embeddings of one device's batch, the updated BN statistics)`
  (BN with axis_name needs a named axis even on one device: vmap over a size-1 axis)."""
  emb, new_vars = jax.vmap(
    lambda v: model.apply(v, jnp.asarray(images), train=True, mutable=["batch_stats"]),
    axis_name=parallel.DATA_AXIS,
    in_axes=None,
    out_axes=None,
    axis_size=1,
  )(variables)
  return emb, new_vars["batch_stats"]


def train_embeddings(model, variables, images):
  return train_forward(model, variables, images)[0]


@pytest.mark.slow
def test_step_matches_single_device_by_hand():
  """Oracle for the 1-device step: loss and first Adam update computed directly."""
  batches = make_batches(1, seed=3)
  model = TinyEmbedder()
  variables = model.init(jax.random.PRNGKey(0), batches[0]["image"][:2], train=False)
  s1, h1, step_fn = run_steps(1, batches, start_step=0)

  def objective(params):
    emb, _ = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      jnp.asarray(batches[0]["image"]),
      train=True,
      mutable=["batch_stats"],
    )
    b = xbm_jax.Embeddings(emb, jnp.asarray(batches[0]["label"]))
    mem = memory.enqueue(memory.init(size=40, dim=8), b)
    return losses.contrastive(b, b) + losses.contrastive(b, mem)

  # BN with axis_name needs a named axis even on one device: vmap over a size-1 axis.
  value, grads = jax.vmap(
    jax.value_and_grad(objective),
    axis_name=parallel.DATA_AXIS,
    in_axes=None,
    out_axes=None,
    axis_size=1,
  )(variables["params"])
  np.testing.assert_allclose(h1[0]["loss"], float(value), rtol=1e-5)
  # The value itself against the NumPy loop over pairs: the memory holds exactly this
  # batch (enqueued first), so L(B, M) = L(B, B).
  emb = train_embeddings(model, variables, batches[0]["image"])
  lab = np.asarray(batches[0]["label"])
  want = 2 * loss_oracles.contrastive(
    np.asarray(emb, np.float64), lab, np.asarray(emb, np.float64), lab
  )
  np.testing.assert_allclose(h1[0]["loss"], want, rtol=1e-4)
  # Adam's first step moves each coordinate by ~lr * sign(g + wd * w).
  g = grads["Dense_1"]["kernel"] + 5e-4 * variables["params"]["Dense_1"]["kernel"]
  delta = np.asarray(s1.params["Dense_1"]["kernel"] - variables["params"]["Dense_1"]["kernel"])
  big = np.abs(np.asarray(g)) > 1e-4
  np.testing.assert_allclose(delta[big], -1e-2 * np.sign(np.asarray(g))[big], rtol=1e-3)


def test_controller_values_never_recompile_the_step(monkeypatch):
  """Start step, memory weight and LR scale change every step: one compiled program
  (the model is applied once per trace of the step)."""
  traces, real = [], TinyEmbedder.apply
  monkeypatch.setattr(
    TinyEmbedder, "apply", lambda self, *a, **kw: traces.append(1) or real(self, *a, **kw)
  )
  batches = make_batches(4, seed=9)
  mesh = parallel.make_mesh(2)
  st, fn = build(mesh, batches[0])
  weights = []
  for i, batch in enumerate(batches):
    ctrl = ctrl_of([2**31 - 1, 1, 1, 0][i], [0.0, 0.5, 1.0, 0.25][i], [1.0, 1.0, 0.5, 0.1][i])
    st, m = fn(st, parallel.global_batch(batch, mesh), ctrl)
    weights.append(float(m["xbm_weight"]))
  assert weights == [0.0, 0.5, 1.0, 0.25]
  assert len(traces) == 1


def _plain_and_accumulated(**build_kw):
  """Metrics and states of two plain steps on the micro-batches (each device's rows
  0-3, then 4-7) at frozen parameters, and of one accumulate=2 step on the whole,
  over 2 devices x 8 rows; with Adam's first moments of each."""
  mesh = parallel.make_mesh(2)
  (big,) = make_batches(1, seed=4)
  micro = [
    {
      k: np.concatenate([v[d * 8 + i * 4 : d * 8 + i * 4 + 4] for d in range(2)])
      for k, v in big.items()
    }
    for i in range(2)
  ]
  frozen = ctrl_of(0, lr_scale=0.0)

  def mu(s):  # Adam's first moments
    return [
      np.asarray(x)
      for path, x in jax.tree_util.tree_flatten_with_path(s.opt_state)[0]
      if "mu" in jax.tree_util.keystr(path)
    ]

  st0, plain = build(mesh, big, **build_kw)
  opt0 = jax.device_get(st0.opt_state)
  s1, m1 = plain(jax.tree.map(jnp.copy, st0), parallel.global_batch(micro[0], mesh), frozen)
  mu1 = mu(s1)
  s1 = s1.replace(
    step=st0.step, opt_state=jax.device_put(opt0, jax.tree.map(lambda x: x.sharding, st0.opt_state))
  )
  s2, m2 = plain(s1, parallel.global_batch(micro[1], mesh), frozen)
  mu2 = mu(s2)
  st0, acc = build(mesh, big, accumulate=2, **build_kw)
  sa, ma = acc(st0, parallel.global_batch(big, mesh), frozen)
  m1, m2, ma, s2, sa = jax.device_get((m1, m2, ma, s2, sa))
  return (m1, m2, ma), (s2, sa), (mu1, mu2, mu(sa))


@pytest.mark.slow
def test_accumulated_step_is_micro_steps_at_frozen_params():
  """accumulate=2 over 2 devices x 8 rows: the memory, BN statistics, loss and pair
  statistics of two plain steps on the micro-batches at frozen parameters
  (lr_scale=0), and their mean gradient (Adam's first moment after one step is
  0.1 g, so it is the mean of the plain steps' moments)."""
  (m1, m2, ma), (s2, sa), (mu1, mu2, mua) = _plain_and_accumulated()
  assert mu1
  for a, b, c in zip(mua, mu1, mu2):
    np.testing.assert_allclose(a, (b + c) / 2, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(ma["loss"], (m1["loss"] + m2["loss"]) / 2, rtol=1e-5)
  for k in ("batch/pos_pairs", "xbm/neg_pairs"):
    assert ma[k] == m1[k] + m2[k], k
  for k in ("batch/mean_pos_sim", "xbm/mean_neg_sim"):
    n = k.replace("mean_", "").replace("_sim", "_pairs")
    want = (m1[k] * m1[n] + m2[k] * m2[n]) / max(m1[n] + m2[n], 1)
    np.testing.assert_allclose(ma[k], want, rtol=1e-5, err_msg=k)
  for name in ("memory", "batch_stats"):
    jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name),
      getattr(s2, name),
      getattr(sa, name),
    )
  assert int(sa.memory.ptr) == 16 and int(sa.step) == 1


def test_accumulated_moment_matching_is_micro_steps_at_frozen_params():
  """With drift_correction="moments" (smoothed, 0.5), each micro-batch corrects the
  memory and updates the moments in turn, as two plain steps do: the same memory,
  smoothed moments and loss."""
  (m1, m2, ma), (s2, sa), _ = _plain_and_accumulated(drift_correction="moments", moments_ema=0.5)
  assert int(sa.moments.steps) == int(s2.moments.steps) == 2
  for name in ("memory", "moments"):
    jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=name),
      getattr(s2, name),
      getattr(sa, name),
    )
  np.testing.assert_allclose(ma["loss"], (m1["loss"] + m2["loss"]) / 2, rtol=1e-5)


def test_accumulated_mean_is_the_whole_steps_sum_over_its_count():
  """reduction="mean" on the memory term, accumulate=2: each term of the accumulated
  step is the micro-batches' summed numerators over their summed active-pair counts
  (contrastive: positives + active negatives, as the plain steps' statistics count
  them), not the mean of the micro-batches' ratios; the batch term stays "paper". The
  memory term excludes by image id (the ids split into micro-batches with the rows)."""
  (m1, m2, ma), (s2, sa), _ = _plain_and_accumulated(
    memory_loss_kwargs={"reduction": "mean", "self_exclusion": "id"}
  )
  np.testing.assert_array_equal(sa.memory.ids, s2.memory.ids)
  n1, n2 = (m["xbm/pos_pairs"] + m["xbm/neg_pairs"] for m in (m1, m2))
  assert n1 != n2  # else the mean of ratios would be exact too
  want_xbm = (m1["loss_xbm"] * n1 + m2["loss_xbm"] * n2) / (n1 + n2)
  np.testing.assert_allclose(ma["loss_xbm"], want_xbm, rtol=1e-5)
  want_batch = (m1["loss_batch"] + m2["loss_batch"]) / 2
  np.testing.assert_allclose(ma["loss_batch"], want_batch, rtol=1e-5)
  np.testing.assert_allclose(ma["loss"], want_batch + want_xbm, rtol=1e-5)


def test_a_user_loss_from_the_config_is_checked_against_its_signature():
  """config.loss.name may be an import path; its options are those of its signature."""
  from xbm_jax.train import config as config_lib, validation
  from xbm_jax.train.errors import ConfigError

  c = config_lib.base()
  c.loss.name = "tests.helpers.custom_losses:margin_rank_row"
  c.loss.kwargs.margin = 0.3
  validation.check_loss(c)
  validation.check_enumerated(c)  # an import path is not one of the built-in names
  c.xbm.memory_loss_kwargs.temperature = 0.1  # a key the base config does not list
  with pytest.raises(ConfigError, match="memory_loss_kwargs.temperature.*'temperature'"):
    validation.check_loss(c)
  c.loss.name = "tests.helpers.custom_losses:no_such_loss"
  with pytest.raises(ConfigError, match="config.loss.name=.*no function 'no_such_loss'"):
    validation.check_loss(c)


def _stale_memory(rng, rows=24, size=40):
  """A memory of `size` slots holding `rows` unit rows off the batch's distribution."""
  stale = rng.normal(size=(rows, 8)) * rng.uniform(0.5, 2.0, size=8) + 0.7
  stale /= np.linalg.norm(stale, axis=1, keepdims=True)
  labels = rng.integers(20, 30, size=rows).astype(np.int32)
  mem = memory.enqueue(
    memory.init(size=size, dim=8), xbm_jax.Embeddings(jnp.asarray(stale, jnp.float32), labels)
  )
  return jax.device_get(mem), stale, labels  # host arrays: the step donates its state


def test_moment_matching_step_equals_numpy_and_is_off_by_default():
  """drift_correction="moments", one step on a memory of 24 stale rows: the stored
  rows become the NumPy formula's (this batch's float64 mean and variance per
  dimension, rows re-normalised), the batch is enqueued after them, and the memory
  term is the NumPy loop over that memory. By default the stale rows stay as they
  were (the reference step)."""
  (batch,) = make_batches(1, seed=5)
  mesh = parallel.make_mesh(1)
  mem, stale, stale_labels = _stale_memory(np.random.default_rng(1))
  model = TinyEmbedder()
  variables = model.init(jax.random.PRNGKey(0), batch["image"][:2], train=False)
  emb = np.asarray(train_embeddings(model, variables, batch["image"]), np.float64)

  mean_b, var_b = emb.mean(0), emb.var(0)
  mean_m, var_m = stale.mean(0), stale.var(0)
  moved = np.sqrt(var_b) * (stale - mean_m) / np.sqrt(np.maximum(var_m, 1e-6)) + mean_b
  moved /= np.linalg.norm(moved, axis=1, keepdims=True)
  want_emb = np.concatenate([moved, emb])
  want_labels = np.concatenate([stale_labels, batch["label"]])

  st, fn = build(mesh, batch, memory_state=mem, drift_correction="moments")
  st, m = jax.device_get(fn(st, parallel.global_batch(batch, mesh), ctrl_of(0)))
  np.testing.assert_allclose(st.memory.emb, want_emb, atol=2e-5)
  np.testing.assert_array_equal(st.memory.labels, want_labels)
  assert int(st.memory.ptr) == 0 and st.moments is None
  want_xbm = loss_oracles.contrastive(emb, batch["label"], want_emb, want_labels)
  np.testing.assert_allclose(m["loss_xbm"], want_xbm, rtol=1e-4)

  st, fn = build(mesh, batch, memory_state=mem)  # the default: no correction
  st, _ = jax.device_get(fn(st, parallel.global_batch(batch, mesh), ctrl_of(0)))
  np.testing.assert_array_equal(st.memory.emb[:24], np.asarray(mem.emb[:24]))


def test_self_exclusion_by_id_drops_the_anchors_older_copies_numpy():
  """One step on a memory of 24 stale rows, 8 of them older copies of this batch's
  images (their ids and labels, another embedding): with self_exclusion="id" the batch
  term and the memory term equal the NumPy loop that drops every positive of the
  anchor's own image (its older copies, its current copy, and a repeat of its image in
  the batch), and the memory stores the batch's ids after the stale ones. Under the
  similarity rule the older copies would count: the losses differ."""
  (batch,) = make_batches(1, seed=5)
  mesh = parallel.make_mesh(1)
  rng = np.random.default_rng(2)
  stale = rng.normal(size=(24, 8))
  stale /= np.linalg.norm(stale, axis=1, keepdims=True)
  labels = rng.integers(20, 30, size=24).astype(np.int32)
  ids = (1000 + np.arange(24)).astype(np.int32)
  labels[:8], ids[:8] = batch["label"][::2], batch["index"][::2]  # older copies
  mem = memory.enqueue(
    memory.init(size=40, dim=8, ids=True),
    xbm_jax.Embeddings(jnp.asarray(stale, jnp.float32), labels, ids=ids),
  )
  model = TinyEmbedder()
  variables = model.init(jax.random.PRNGKey(0), batch["image"][:2], train=False)
  emb = np.asarray(train_embeddings(model, variables, batch["image"]), np.float64)
  lab, idx = batch["label"], batch["index"]
  st, fn = build(
    mesh, batch, memory_state=jax.device_get(mem), loss_kwargs={"self_exclusion": "id"}
  )
  st, m = jax.device_get(fn(st, parallel.global_batch(batch, mesh), ctrl_of(0)))
  want_emb, want_lab = np.concatenate([stale, emb]), np.concatenate([labels, lab])
  want_ids = np.concatenate([ids, idx])
  np.testing.assert_array_equal(st.memory.ids, want_ids)
  want_xbm = loss_oracles.contrastive(emb, lab, want_emb, want_lab, ids=(idx, want_ids))
  np.testing.assert_allclose(m["loss_xbm"], want_xbm, rtol=1e-4)
  np.testing.assert_allclose(
    m["loss_batch"], loss_oracles.contrastive(emb, lab, emb, lab, ids=(idx, idx)), rtol=1e-4
  )
  kept = loss_oracles.contrastive(emb, lab, want_emb, want_lab)  # the similarity rule
  assert abs(kept - want_xbm) > 1e-2


def _sorted_rows(mem):
  """The memory's (label, valid, image id, emb) rows in a canonical order (a sharded
  memory holds the same entries as a replicated one in another slot order)."""
  table = np.column_stack([mem.labels, mem.valid, mem.ids, np.asarray(mem.emb)])
  return table[np.lexsort(table.T[::-1])]


@pytest.mark.slow
def test_drift_corrections_one_device_equals_eight_replicated_and_sharded():
  """3 steps with the smoothed moment matching (moments_ema=0.5) and the momentum
  encoder (0.5), memory from step 0, the memory term excluding by image id: 1 device,
  8 devices and 8 devices with the memory sharded (moments combined across shards)
  give the same losses, parameters, smoothed moments, key encoder and memory entries
  (image ids included)."""
  batches = make_batches(3, seed=6)
  runs = []
  for n, sharded in ((1, False), (8, False), (8, True)):
    mesh = parallel.make_mesh(n)
    st, fn = build(
      mesh,
      batches[0],
      mem_size=64,
      sharded=sharded,
      drift_correction="moments",
      moments_ema=0.5,
      momentum_encoder=0.5,
      memory_loss_kwargs={"self_exclusion": "id"},
    )
    history = []
    for batch in batches:
      st, m = fn(st, parallel.global_batch(batch, mesh), ctrl_of(0))
      history.append(jax.device_get(m))
    runs.append((jax.device_get(st), history))
  (s1, h1) = runs[0]
  assert int(s1.moments.steps) == 3
  for st, history in runs[1:]:
    for a, b in zip(h1, history):
      for k in ("loss", "loss_xbm", "xbm/mean_pos_sim"):
        np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=1e-6, err_msg=k)
    for name in ("params", "moments", "key_encoder"):
      jax.tree.map(
        lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5, err_msg=name),
        getattr(s1, name),
        getattr(st, name),
      )
    np.testing.assert_allclose(_sorted_rows(st.memory), _sorted_rows(s1.memory), atol=1e-5)


def test_momentum_encoder_is_the_ema_of_the_params_and_embeds_what_is_enqueued():
  """momentum_encoder=0.5, 3 steps with the memory on from step 0: the key encoder's
  params are the moving average by hand of the params each step started from
  (theta_k <- 0.5 theta_k + 0.5 theta, from theta_0); the rows step 2 enqueued are
  the key encoder's train-mode embeddings of its batch (its params after that
  step's move, its BN statistics before it), not the trained encoder's, and its BN
  statistics are those that forward leaves."""
  batches = make_batches(3, seed=8)
  mesh = parallel.make_mesh(1)
  st, fn = build(mesh, batches[0], mem_size=48, momentum_encoder=0.5)
  started = []
  for batch in batches:
    started.append(jax.device_get(st.params))
    key_before = jax.device_get(st.key_encoder)
    st, _ = fn(st, parallel.global_batch(batch, mesh), ctrl_of(0))
  st = jax.device_get(st)

  by_hand = jax.tree.map(lambda x: np.asarray(x, np.float64), started[0])
  for params in started:
    by_hand = jax.tree.map(lambda k, q: 0.5 * k + 0.5 * np.asarray(q, np.float64), by_hand, params)
  jax.tree.map(
    lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7),
    st.key_encoder.params,
    by_hand,
  )
  assert int(st.key_encoder.steps) == 3

  model = TinyEmbedder()
  key_vars = {"params": st.key_encoder.params, "batch_stats": key_before.batch_stats}
  keys, key_stats = train_forward(model, key_vars, batches[2]["image"])
  np.testing.assert_allclose(st.memory.emb[32:48], keys, atol=1e-5)
  jax.tree.map(
    lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6),
    st.key_encoder.batch_stats,
    key_stats,
  )
  trained = train_embeddings(
    model, {"params": started[2], "batch_stats": key_before.batch_stats}, batches[2]["image"]
  )
  assert np.abs(np.asarray(trained) - np.asarray(keys)).max() > 1e-3

  # With the memory off, the key encoder still tracks the params; nothing is enqueued.
  stored = st.memory.emb
  st, _ = jax.device_get(fn(st, parallel.global_batch(batches[0], mesh), ctrl_of(2**31 - 1)))
  assert int(st.key_encoder.steps) == 4
  np.testing.assert_array_equal(st.memory.emb, stored)
