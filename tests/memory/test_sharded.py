"""The sharded memory and its exact losses, on 8 fake CPU devices.

Oracles: the replicated losses of `xbm_jax.losses` on the global array of the
sharded memory (an independent algorithm: one device, no collectives), a
Python-list ring buffer, and a training run with a replicated memory.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from xbm_jax import losses, memory
from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.embeddings import Embeddings, l2_normalize
from xbm_jax.memory import MemoryState

N = 8  # devices
B = 2  # local batch
G = N * B  # global batch
D = 8
SIZE = 32  # k = 4 rows per shard
K = SIZE // N
AX = "data"


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == N, "conftest must provide 8 fake CPU devices"
  return jax.make_mesh((N,), (AX,))


def _split(tree, mesh):
  """Places arrays split on their first axis over the mesh (an Explicit mesh
  wants shard_map inputs already laid out as its in_specs say)."""
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, P(AX)))


def _batch(rng, n, *, n_labels=4, invalid=()):
  emb = l2_normalize(jnp.asarray(rng.normal(size=(n, D)), jnp.float32))
  labels = jnp.asarray(rng.integers(0, n_labels, size=n), jnp.int32)
  valid = np.ones(n, bool)
  valid[list(invalid)] = False
  return Embeddings(emb, labels, jnp.asarray(valid))


@functools.lru_cache(maxsize=None)  # one compile per mesh for the whole file
def _enqueue_fn(mesh):
  spec = sharded_memory.specs(AX)
  return jax.jit(
    jax.shard_map(
      lambda m, e, l, v: sharded_memory.enqueue_local(m, Embeddings(e, l, v)),
      mesh=mesh,
      in_specs=(spec, P(AX), P(AX), P(AX)),
      out_specs=spec,
    )
  )


def _memories(mesh):
  """name -> (sharded memory, global query batch, global self slot ids [G])."""
  rng = np.random.default_rng(0)
  enq = _enqueue_fn(mesh)
  empty = sharded_memory.put(sharded_memory.init(size=SIZE, dim=D, n_shards=N), mesh)
  out = {}
  mem = empty
  for step in range(3):
    q = _batch(rng, G, invalid=(3, 12) if step == 2 else ())
    q = _split(q, mesh)
    mem = enq(mem, *q[:3])
    # slots of this enqueue: shard d, local rows (ptr - B .. ptr - 1) mod K
    p = int(np.asarray(mem.ptr)[0])
    local = (p - B + np.arange(B)) % K
    slots = (np.arange(N)[:, None] * K + local[None, :]).reshape(-1)
    name = {0: "partly_filled", 1: "full", 2: "wrapped_invalid"}[step]
    out[name] = (mem, q, jnp.asarray(slots, jnp.int32))
  q = _batch(rng, G, invalid=(0,))
  out["empty"] = (empty, q, jnp.full((G,), -1, jnp.int32))
  out = {k: _split(v, mesh) for k, v in out.items()}
  # Duplicated entries across shards: ties for hardest positive / negative.
  m, q, slots = out["full"]
  emb, labels = np.array(m.emb), np.array(m.labels)
  emb[K + 1] = emb[K + 2] = emb[5 * K + 2] = emb[2]
  labels[K + 1] = labels[K + 2] = labels[5 * K + 2] = labels[2]
  # Half the anchors ARE entry 2 but with another label: its 4 copies (shard
  # 0, shard 1 twice, shard 5) tie as the hardest negative; the others are entry 9.
  tied = Embeddings(
    jnp.asarray(emb[[2, 9]]).repeat(G // 2, 0),
    jnp.asarray([(labels[2] + 1) % 4, labels[9]]).repeat(G // 2, 0),
    q.valid,
  )
  out["ties"] = _split(
    (m._replace(emb=jnp.asarray(emb), labels=jnp.asarray(labels)), tied, slots), mesh
  )
  return out


CASES = [  # each options value is covered at least once (compiles are the cost)
  ("contrastive", dict()),
  ("contrastive", dict(reduction="mean", self_exclusion="index")),
  ("multi_similarity", dict(reduction="mean", self_exclusion="none")),
  ("multi_similarity", dict(self_exclusion="index", beta=10.0)),
  ("triplet", dict(mining="hard", reduction="mean", self_exclusion="index")),
  ("triplet", dict(mining="all", margin=0.3)),
  ("triplet", dict(mining="semihard", reduction="mean", self_exclusion="none", margin=0.3)),
]


def _sharded_fns(mesh, name, kw, *, inbody=False):
  """jit(values, stats, grad of the whole shard_map wrt the global query); with
  `inbody`, the grad is instead taken inside the body, per device (a train step)."""
  fn = functools.partial(losses.get(name), axis_name=AX, **kw)
  spec = sharded_memory.specs(AX)
  in_specs = (P(AX), P(AX), P(AX), P(AX), spec, P(AX))

  def body(e, l, v, idx, mem, w):
    def local(e_):
      loss, stats = fn(Embeddings(e_, l, v), mem, self_index=idx, return_stats=True)
      return loss * w[0], stats

    if inbody:
      (loss, stats), g = jax.value_and_grad(local, has_aux=True)(e)
      return loss[None], jax.tree.map(lambda x: x[None], stats), g
    loss, stats = local(e)
    return loss[None], jax.tree.map(lambda x: x[None], stats)

  run = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P(AX))
  if inbody:
    return jax.jit(run)

  @jax.jit
  def f(e, l, v, idx, mem, w):
    (_, (per, stats)), grad = jax.value_and_grad(
      lambda e_: (lambda o: (jnp.sum(o[0]), o))(run(e_, l, v, idx, mem, w)), has_aux=True
    )(e)
    return per, stats, grad

  return f


def _replicated_fn(name, kw):
  """The oracle: each device's local anchors against the global array, on one device."""
  fn = functools.partial(losses.get(name), **kw)

  @jax.jit
  def f(e, l, v, idx, mem, w):
    full = Embeddings(mem.emb, mem.labels, mem.valid)
    per_dev = jax.vmap(
      lambda e_, l_, v_, i_: fn(Embeddings(e_, l_, v_), full, self_index=i_, return_stats=True)
    )
    split = lambda x: x.reshape((N, B) + x.shape[1:])

    def total(e_):
      per, stats = per_dev(split(e_), split(l), split(v), split(idx))
      return jnp.sum(per * w), (per * w, stats)

    (_, (per, stats)), grad = jax.value_and_grad(total, has_aux=True)(e)
    return per, stats, grad

  return f


def _compare(mesh, memories, name, kw, *, inbody=False):
  sharded, replicated = _sharded_fns(mesh, name, kw, inbody=inbody), _replicated_fn(name, kw)
  w = _split(jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, size=N), jnp.float32), mesh)
  nonzero = 0
  for state, (mem, q, slots) in memories.items():
    args = (q.emb, q.labels, q.valid, slots, mem, w)
    per, stats, grad = sharded(*args)
    r_per, r_stats, r_grad = replicated(*jax.device_get(args))  # one device, no mesh
    msg = f"{name} {kw} memory={state}"
    np.testing.assert_allclose(per, r_per, rtol=2e-5, atol=1e-6, err_msg=msg)
    for key in r_stats:
      np.testing.assert_allclose(
        stats[key], r_stats[key], rtol=2e-5, atol=1e-6, err_msg=f"{msg} stat {key}"
      )
    np.testing.assert_allclose(grad, r_grad, rtol=2e-5, atol=1e-6, err_msg=msg + " grad")
    nonzero += int(np.any(np.asarray(r_per) != 0)) + int(np.any(np.asarray(r_grad) != 0))
    if state == "empty":
      assert np.all(np.asarray(per) == 0), msg
  assert nonzero >= 6, f"{name} {kw}: too few non-trivial cases to be a test"


@pytest.fixture(scope="module")
def memories(mesh):
  return _memories(mesh)


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{kw}" for n, kw in CASES])
def test_sharded_loss_equals_replicated(mesh, memories, name, kw):
  """Values, stats and grad (of the whole shard_mapped function) on every memory state."""
  _compare(mesh, memories, name, kw)


INBODY = [("multi_similarity", dict())]  # triplet "hard": see the training test


@pytest.mark.slow
@pytest.mark.parametrize("name,kw", INBODY, ids=[f"{n}-{kw}" for n, kw in INBODY])
def test_sharded_grad_inside_shard_map(mesh, memories, name, kw):
  """jax.grad taken per device inside the body (as a train step does) reaches
  each device's own anchors exactly as the replicated loss's gradient."""
  _compare(mesh, memories, name, kw, inbody=True)


# ---------------------------------------------------------------- the memory itself


def _stream(rng, steps, n, b, *, start=0):
  """Global batches whose labels are unique ids: 1000 * step + row (device-major)."""
  out = []
  for s in range(start, start + steps):
    emb = l2_normalize(jnp.asarray(rng.normal(size=(n * b, D)), jnp.float32))
    labels = jnp.asarray(1000 * s + np.arange(n * b), jnp.int32)
    valid = jnp.asarray(rng.uniform(size=n * b) > 0.2)
    out.append(Embeddings(emb, labels, valid))
  return out


@pytest.mark.parametrize("masked", [False, True])
def test_enqueue_local_is_a_ring_per_shard(mesh, masked):
  """Each shard is the FIFO ring of its own device's rows (Python-list oracle),
  `when=False` leaves it untouched, and invalid rows take a slot; with an enqueue
  mask, only the selected rows, in order (shards then fill unevenly)."""
  rng = np.random.default_rng(2)
  spec = sharded_memory.specs(AX)
  enq = jax.jit(
    jax.shard_map(
      lambda m, e, l, v, w, k: sharded_memory.enqueue_local(m, Embeddings(e, l, v), when=w, mask=k),
      mesh=mesh,
      in_specs=(spec, P(AX), P(AX), P(AX), P(), P(AX)),
      out_specs=spec,
    )
  )
  mem = sharded_memory.put(sharded_memory.init(size=SIZE, dim=D, n_shards=N), mesh)
  rings = [[None] * K for _ in range(N)]  # (label, valid) per slot
  ptrs = [0] * N
  for i, batch in enumerate(_stream(rng, 9 if masked else 5, N, B)):
    when = i != 2
    keep = rng.random(G) < 0.5 if masked else np.ones(G, bool)
    mem = enq(mem, *_split(batch, mesh)[:3], jnp.asarray(when), _split(jnp.asarray(keep), mesh))
    if when:
      for d in range(N):
        for j in range(B):
          row = d * B + j
          if keep[row]:
            rings[d][ptrs[d]] = (int(batch.labels[row]), bool(batch.valid[row]))
            ptrs[d] = (ptrs[d] + 1) % K
  labels, valid = np.asarray(mem.labels), np.asarray(mem.valid)
  assert np.asarray(mem.ptr).tolist() == ptrs
  for d in range(N):
    for j in range(K):
      exp = rings[d][j]
      got = (int(labels[d * K + j]), bool(valid[d * K + j]))
      assert got == (exp if exp is not None else (0, False)), (d, j)


def test_clear_errors(mesh):
  with pytest.raises(ValueError, match="divisible by the number of devices"):
    sharded_memory.init(size=30, dim=D, n_shards=N)
  with pytest.raises(ValueError, match="ptr must be"):
    sharded_memory.put(memory.init(size=SIZE, dim=D), mesh)
  with pytest.raises(ValueError, match="divisible"):
    sharded_memory.reshard(jax.device_get(sharded_memory.init(size=SIZE, dim=D, n_shards=N)), 3)


def _entries(mem):
  """{label: emb row} of the valid entries of a (global-array) memory."""
  mem = jax.device_get(mem)
  return {int(l): np.asarray(e) for l, e, v in zip(mem.labels, mem.emb, mem.valid) if v}


@pytest.mark.slow
@pytest.mark.parametrize("n_new", [8, 4, 1])
def test_reshard_keeps_entries_and_evicts_oldest_first(mesh, n_new):
  """Restore onto n_new devices: every entry survives; further enqueues evict
  the oldest steps first; resharding to the same count changes nothing."""
  rng = np.random.default_rng(4)
  old = sharded_memory.put(sharded_memory.init(size=SIZE, dim=D, n_shards=N), mesh)
  enq = _enqueue_fn(mesh)
  for batch in _stream(rng, 3, N, B):  # wrapped once (2 steps fill it)
    old = enq(old, *_split(batch, mesh)[:3])
  saved = {k: np.asarray(v) for k, v in jax.device_get(old)._asdict().items()}
  new = sharded_memory.reshard(saved, n_new)
  assert new.ptr.shape == (n_new,) and new.emb.shape == (SIZE, D)
  assert _entries(new).keys() == _entries(old).keys()
  for key, row in _entries(new).items():
    np.testing.assert_array_equal(row, _entries(old)[key])

  mesh_new = jax.make_mesh((n_new,), (AX,), devices=jax.devices()[:n_new])
  new = sharded_memory.put(new, mesh_new)
  enq_new = _enqueue_fn(mesh_new)
  b_new = G // n_new // 2  # 8 rows per step, whatever n_new
  later = _stream(rng, 2, n_new, b_new, start=3)
  for batch in later:
    new = enq_new(new, *_split(batch, mesh_new)[:3])
  kept = _entries(new)
  written = {
    int(l)
    for bt in _stream(np.random.default_rng(4), 3, N, B) + later
    for l, v in zip(bt.labels, bt.valid)
  }
  evicted = written - set(int(l) for bt in later for l in bt.labels) - kept.keys()
  for bt in later:  # every new valid row is in
    assert {int(l) for l, v in zip(bt.labels, bt.valid) if v} <= kept.keys()
  if evicted:  # oldest steps out first
    assert max(evicted) // 1000 <= min(kept) // 1000
  if n_new == N:  # transparent: same as not resharding
    for batch in later:
      old = enq(old, *_split(batch, mesh)[:3])
    assert _entries(old).keys() == kept.keys()


def test_reshard_partly_filled_writes_empty_slots_first(mesh):
  rng = np.random.default_rng(5)
  old = sharded_memory.put(sharded_memory.init(size=SIZE, dim=D, n_shards=N), mesh)
  batch = _stream(rng, 1, N, B)[0]._replace(valid=jnp.ones((G,), bool))
  old = _enqueue_fn(mesh)(old, *_split(batch, mesh)[:3])  # 16 of 32 slots
  new = sharded_memory.reshard(jax.device_get(old), 4)
  mesh4 = jax.make_mesh((4,), (AX,), devices=jax.devices()[:4])
  new = sharded_memory.put(new, mesh4)
  for more in _stream(rng, 2, 4, 2, start=1):  # 16 more rows
    new = _enqueue_fn(mesh4)(new, *_split(more._replace(valid=jnp.ones((8,), bool)), mesh4)[:3])
  assert set(np.asarray(batch.labels).tolist()) <= _entries(new).keys()
  assert np.all(np.asarray(new.valid))


def test_orbax_checkpoint_restores_onto_another_device_count(mesh, tmp_path):
  """Save the sharded memory with orbax; restore it as numpy onto 8 devices
  (unchanged) and onto 4 (resharded: same entries, and it keeps working)."""
  ocp = pytest.importorskip("orbax.checkpoint")
  rng = np.random.default_rng(8)
  mem = sharded_memory.init(size=SIZE, dim=D, n_shards=N, mesh=mesh)
  assert mem.emb.sharding.spec == P(AX)
  enq = _enqueue_fn(mesh)
  for batch in _stream(rng, 3, N, B):
    mem = enq(mem, *_split(batch, mesh)[:3])
  ckpt = ocp.StandardCheckpointer()
  leaves = {k: v for k, v in mem._asdict().items() if v is not None}  # no image ids here
  ckpt.save(tmp_path / "memory", leaves)
  ckpt.wait_until_finished()
  target = {k: np.zeros(v.shape, v.dtype) for k, v in leaves.items()}
  saved = ckpt.restore(tmp_path / "memory", target)
  same = sharded_memory.restore(saved, mesh)
  for got, exp in zip(jax.device_get(same), jax.device_get(mem)):
    np.testing.assert_array_equal(got, exp)
  mesh4 = jax.make_mesh((4,), (AX,), devices=jax.devices()[:4])
  four = sharded_memory.restore(saved, mesh4)
  assert four.ptr.shape == (4,) and four.emb.sharding.spec == P(AX)
  assert _entries(four).keys() == _entries(mem).keys()
  more = _stream(rng, 1, 4, 2, start=3)[0]
  four = _enqueue_fn(mesh4)(four, *_split(more, mesh4)[:3])
  assert {int(l) for l, v in zip(more.labels, more.valid) if v} <= _entries(four).keys()


# ---------------------------------------------------------------- training steps


def _train(mesh, sharding, loss_name, loss_kw, batches, *, steps=4, start_step=1):
  """A tiny data-parallel XBM run: emb = normalize(x W); SGD on pmean'd grads."""
  opt = optax.sgd(0.5)
  params = jnp.asarray(np.random.default_rng(6).normal(size=(6, D)), jnp.float32)
  opt_state = opt.init(params)
  if sharding == "sharded":
    mem = sharded_memory.put(sharded_memory.init(size=SIZE, dim=D, n_shards=N), mesh)
    mem_spec = sharded_memory.specs(AX)
  else:
    mem, mem_spec = memory.init(size=SIZE, dim=D), MemoryState(P(), P(), P(), P())

  def body(params, opt_state, mem, x, labels, step):
    if sharding == "replicated":
      # The replicated memory must stay device-invariant (out_specs P()): gather
      # the batch with a psum of one-hot placements, whose output is invariant.
      me = jax.lax.axis_index(AX)
      place = lambda v: jax.lax.psum(
        jax.lax.dynamic_update_slice_in_dim(
          jnp.zeros((G,) + v.shape[1:], v.dtype), v, me * B, axis=0
        ),
        AX,
      )
      whole = Embeddings(place(l2_normalize(x @ params)), place(labels))
      mem = memory.enqueue(mem, whole, when=step >= start_step)

    def loss_fn(p):
      q = Embeddings(l2_normalize(x @ p), labels)
      batch = Embeddings(
        jax.lax.all_gather(q.emb, AX, tiled=True), jax.lax.all_gather(labels, AX, tiled=True)
      )
      if sharding == "sharded":
        return losses.xbm_total_loss(
          q, batch, mem, step=step, start_step=start_step, loss=loss_name, axis_name=AX, **loss_kw
        )
      return losses.xbm_total_loss(
        q, batch, mem, step=step, start_step=start_step, loss=loss_name, enqueue=False, **loss_kw
      )

    (loss, (new_mem, aux)), g = jax.value_and_grad(
      lambda p: (lambda o: (o[0], o[1:]))(loss_fn(p)), has_aux=True
    )(params)
    g = jax.lax.pmean(g, AX)
    updates, opt_state = opt.update(g, opt_state, params)
    return (
      optax.apply_updates(params, updates),
      opt_state,
      new_mem,
      jax.lax.pmean(loss, AX)[None],
      aux["loss_xbm"][None],
    )

  step_fn = jax.jit(
    jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(P(), P(), mem_spec, P(AX), P(AX), P()),
      out_specs=(P(), P(), mem_spec, P(AX), P(AX)),
    )
  )
  trace = []
  for step in range(steps):
    x, labels = _split(batches[step], mesh)
    params, opt_state, mem, loss, loss_xbm = step_fn(
      params, opt_state, mem, x, labels, jnp.asarray(step)
    )
    trace.append((np.asarray(loss), np.asarray(loss_xbm)))
  return params, mem, trace


@pytest.mark.slow
def test_training_steps_sharded_equal_replicated(mesh):
  """4 steps (memory from step 1, wrapping at step 3): same losses, parameters
  and memory with `memory_sharding` replicated and sharded."""
  loss_name, loss_kw = "triplet", dict(mining="hard", margin=0.3)
  rng = np.random.default_rng(7)
  batches = [
    (
      jnp.asarray(rng.normal(size=(G, 6)), jnp.float32),
      jnp.asarray(rng.integers(0, 3, size=G), jnp.int32),
    )
    for _ in range(4)
  ]
  p_r, m_r, t_r = _train(mesh, "replicated", loss_name, loss_kw, batches)
  p_s, m_s, t_s = _train(mesh, "sharded", loss_name, loss_kw, batches)
  assert any(np.any(lx != 0) for _, lx in t_r[1:]), "memory term never active"
  for step, ((l_r, x_r), (l_s, x_s)) in enumerate(zip(t_r, t_s)):
    np.testing.assert_allclose(l_s, l_r, rtol=1e-5, err_msg=f"loss at step {step}")
    np.testing.assert_allclose(x_s, x_r, rtol=1e-5, atol=1e-7, err_msg=f"xbm loss {step}")
  np.testing.assert_allclose(p_s, p_r, rtol=1e-5, atol=1e-6)

  # 3 enqueues of 16 rows into 32 slots: wrapped, and still the same entries (the
  # same rows in another slot order: compared sorted by label, then by value).
  def rows(mem):
    mem = jax.device_get(mem)
    table = np.column_stack([mem.labels, mem.valid, np.asarray(mem.emb)])
    return table[np.lexsort(table.T[::-1])]

  np.testing.assert_allclose(rows(m_s), rows(m_r), rtol=1e-5, atol=1e-6)
