"""The one-call objective (`losses.xbm_total_loss`) as written inside a data-parallel
shard_map step, replication checks on: on 8 fake devices it equals one device (loss,
gradient, memory), with the replicated and the sharded memory, "paper" and "mean",
padding rows spread unevenly and an enqueue mask. Oracles: the NumPy loop over
pairs (tests/helpers/loss_oracles.py) on the memory's contents, and a Python list of the
rows the mask selects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.helpers import loss_oracles as oracle
from xbm_jax import losses, memory
from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.embeddings import Embeddings

N, B, D, SIZE, AX = 8, 2, 4, 64, "data"
G = N * B


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((N,), (AX,))


def _batches(steps=2, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for s in range(steps):
    e = rng.normal(size=(G, D))
    e = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)
    labels = rng.integers(0, 3, G).astype(np.int32)
    valid = np.ones(G, bool)
    valid[[1, 2, 3, 9]] = s == 0  # step 1: devices 0 and 1 lose 3 rows, device 4 one
    keep = rng.random(G) < 0.6  # enqueue mask
    out.append((e, labels, valid, keep))
  return out


def _one_device(kw):
  def f(e, l, v, keep, mem, step):
    q = Embeddings(e, l, v)
    total, mem, aux = losses.xbm_total_loss(
      q, q, mem, step=step, start_step=0, enqueue_mask=keep, **kw
    )
    return total, mem

  return jax.jit(jax.value_and_grad(f, has_aux=True))


def _eight_devices(mesh, kw, sharded):
  mem_spec = sharded_memory.specs(AX) if sharded else memory.MemoryState(P(), P(), P(), P())

  def body(e, l, v, keep, mem, step):
    local = Embeddings(e, l, v)
    gather = lambda x: jax.lax.all_gather(x, AX, tiled=True)
    batch = Embeddings(gather(e), gather(l), gather(v))
    total, mem, aux = losses.xbm_total_loss(
      local,
      batch,
      mem,
      step=step,
      start_step=0,
      enqueue_mask=keep,
      axis_name=AX if sharded else None,
      **kw,
    )
    return jax.lax.pmean(total, AX), mem

  run = jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(P(AX), P(AX), P(AX), P(AX), mem_spec, P()),
    out_specs=(P(), mem_spec),
  )
  return jax.jit(jax.value_and_grad(run, has_aux=True))


def _numpy_total(e, l, v, mem_rows, reduction):
  me, ml, mv = (np.asarray([r[k] for r in mem_rows]) for k in range(3))
  return oracle.contrastive(e, l, e, l, v, v, reduction=reduction) + oracle.contrastive(
    e, l, me, ml, v, mv, reduction=reduction
  )


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "sharded"])
@pytest.mark.parametrize("reduction", ["paper", "mean"])
def test_one_call_in_shard_map_equals_one_device(mesh, reduction, sharded):
  kw = {"reduction": reduction}
  one, eight = _one_device(kw), _eight_devices(mesh, kw, sharded)
  mem1 = memory.init(size=SIZE, dim=D)
  if sharded:
    mem8 = sharded_memory.init(size=SIZE, dim=D, n_shards=N, mesh=mesh)
  else:
    mem8 = jax.device_put(mem1, NamedSharding(mesh, P()))
  split = NamedSharding(mesh, P(AX))
  entries = []  # the list model: (emb, label, valid) of each enqueued row, in order
  for step, (e, l, v, keep) in enumerate(_batches()):
    (t1, mem1), g1 = one(e, l, v, keep, mem1, step)
    args = [jax.device_put(jnp.asarray(x), split) for x in (e, l, v, keep)]
    (t8, mem8), g8 = eight(*args, mem8, jnp.int32(step))
    entries += [(e[i], l[i], v[i]) for i in range(G) if keep[i]]
    want = _numpy_total(e, l, v, entries, reduction)
    np.testing.assert_allclose(float(t1), want, rtol=2e-5, err_msg=f"one device, step {step}")
    np.testing.assert_allclose(float(t8), float(t1), rtol=2e-5, err_msg=f"8 devices, step {step}")
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=2e-5, atol=1e-6)
  # The replicated memory holds the selected rows in order; a shard, its device's.
  k = len(entries)
  assert int(mem1.ptr) == k and np.asarray(mem1.valid[:k]).tolist() == [r[2] for r in entries]
  np.testing.assert_array_equal(np.asarray(mem1.emb[:k]), np.stack([r[0] for r in entries]))
  if sharded:
    got = jax.device_get(mem8)
    for d in range(N):
      rows = [
        (e[i], l[i]) for e, l, _, keep in _batches() for i in range(d * B, d * B + B) if keep[i]
      ]
      shard = slice(d * (SIZE // N), d * (SIZE // N) + len(rows))
      assert int(got.ptr[d]) == len(rows)
      np.testing.assert_array_equal(got.labels[shard], [r[1] for r in rows])
  else:
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(mem8), jax.device_get(mem1))


def test_bad_enqueue_mask_is_a_clear_error():
  q = Embeddings(jnp.eye(4, dtype=jnp.float32), jnp.arange(4))
  mem = memory.init(size=8, dim=4)
  call = lambda mask: losses.xbm_total_loss(q, q, mem, step=0, start_step=0, enqueue_mask=mask)
  with pytest.raises(ValueError, match=r"enqueue_mask must be \[4\]"):
    call(jnp.ones((3,), bool))
  with pytest.raises(TypeError, match="enqueue_mask must be a bool array"):
    call(jnp.ones((4,), jnp.int32))
  with pytest.raises(TypeError, match="mask must be a bool array"):
    memory.enqueue(mem, q, mask=jnp.ones((4,)))
  with pytest.raises(ValueError, match=r"mask must be \[4\]"):
    memory.enqueue(mem, q, mask=jnp.ones((2, 2), bool))


def _recurring_images(steps=3, seed=5, pool=24):
  """Batches of G images drawn from a pool, so that images recur across steps, each
  time a fresh augmentation (its base vector plus noise): (emb, labels, ids)."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(pool, D))
  pool_labels = np.arange(pool, dtype=np.int32) % 4
  out = []
  for _ in range(steps):
    ids = rng.choice(pool, G, replace=False).astype(np.int32)
    e = base[ids] + 0.3 * rng.normal(size=(G, D))
    out.append(
      ((e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32), pool_labels[ids], ids)
    )
  return out


@pytest.mark.parametrize("sharded", [False, True], ids=["replicated", "sharded"])
def test_self_exclusion_by_image_id(mesh, sharded):
  """The memory stores each entry's image id; with self_exclusion="id" an anchor's
  own older copies (earlier augmentations of its image) are no positives: one device
  equals the NumPy oracle with ids, and 8 devices (replicated or sharded memory) equal
  one device in loss, gradient and stored ids."""
  kw = {"self_exclusion": "id"}

  def one(e, l, i, mem, step):
    q = Embeddings(e, l, None, i)
    total, mem, _ = losses.xbm_total_loss(q, q, mem, step=step, start_step=0, **kw)
    return total, mem

  mem_spec = (
    sharded_memory.specs(AX, ids=True) if sharded else memory.MemoryState(P(), P(), P(), P(), P())
  )

  def body(e, l, i, mem, step):
    gather = lambda x: jax.lax.all_gather(x, AX, tiled=True)
    total, mem, _ = losses.xbm_total_loss(
      Embeddings(e, l, None, i),
      Embeddings(gather(e), gather(l), None, gather(i)),
      mem,
      step=step,
      start_step=0,
      axis_name=AX if sharded else None,
      **kw,
    )
    return jax.lax.pmean(total, AX), mem

  eight = jax.shard_map(
    body, mesh=mesh, in_specs=(P(AX), P(AX), P(AX), mem_spec, P()), out_specs=(P(), mem_spec)
  )
  one = jax.jit(jax.value_and_grad(one, has_aux=True))
  eight = jax.jit(jax.value_and_grad(eight, has_aux=True))
  mem1 = memory.init(size=SIZE, dim=D, ids=True)
  if sharded:
    mem8 = sharded_memory.init(size=SIZE, dim=D, n_shards=N, mesh=mesh, ids=True)
  else:
    mem8 = jax.device_put(mem1, NamedSharding(mesh, P()))
  split = NamedSharding(mesh, P(AX))
  entries, differs = [], False
  for step, (e, l, i) in enumerate(_recurring_images()):
    (t1, mem1), g1 = one(e, l, i, mem1, step)
    args = [jax.device_put(jnp.asarray(x), split) for x in (e, l, i)]
    (t8, mem8), g8 = eight(*args, mem8, jnp.int32(step))
    entries += list(zip(e, l, i))
    me, ml, mi = (np.asarray([r[k] for r in entries]) for k in range(3))
    want = oracle.contrastive(e, l, e, l, ids=(i, i)) + oracle.contrastive(
      e, l, me, ml, ids=(i, mi)
    )
    np.testing.assert_allclose(float(t1), want, rtol=2e-5, err_msg=f"one device, step {step}")
    np.testing.assert_allclose(float(t8), float(t1), rtol=2e-5, err_msg=f"8 devices, step {step}")
    np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=2e-5, atol=1e-6)
    keep_copies = oracle.contrastive(e, l, e, l) + oracle.contrastive(e, l, me, ml)
    differs |= abs(keep_copies - want) > 1e-3
  assert differs, "no anchor met an older copy of its image: not a test"
  assert sorted(np.asarray(mem1.ids[: len(entries)]).tolist()) == sorted(mi.tolist())
  assert sorted(
    np.asarray(jax.device_get(mem8).ids)[np.asarray(jax.device_get(mem8).valid)].tolist()
  ) == sorted(mi.tolist())


def test_self_exclusion_by_id_needs_ids_on_both_sides():
  q = Embeddings(jnp.eye(4, dtype=jnp.float32), jnp.arange(4) % 2, None, jnp.arange(4))
  with pytest.raises(ValueError, match="the reference has none"):
    losses.contrastive(q, q._replace(ids=None), self_exclusion="id")
  with pytest.raises(ValueError, match="batch.ids must be given"):
    memory.enqueue(memory.init(size=8, dim=4, ids=True), q._replace(ids=None))
  with pytest.raises(TypeError, match="query.ids must be integers"):
    losses.contrastive(q._replace(ids=jnp.zeros(4)), q, self_exclusion="id")


def _memory_products(jaxpr) -> int:
  """dot_general equations in a jaxpr, its sub-jaxprs (cond branches, pjit) included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "dot_general"
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          n += _memory_products(getattr(inner, "jaxpr", inner))
  return n


@pytest.mark.slow
def test_before_the_start_the_memory_term_is_not_computed():
  """Before `start_step` (and while a guard holds the memory off) the step takes the
  zero branch of a `lax.cond`: the memory's statistics are 0 although it holds pairs
  the term would count (a computed-then-weighted-0 term reports them), the loss is the
  batch term alone, and the zero branch holds no product."""
  e, l, v, _ = _batches(1)[0]
  q = Embeddings(jnp.asarray(e), jnp.asarray(l), jnp.asarray(v))
  mem = memory.enqueue(memory.init(size=SIZE, dim=D), q)  # same rows: positives galore
  run = lambda step: losses.xbm_total_loss(q, q, mem, step=step, start_step=5)
  total, new_mem, aux = run(4)
  assert int(aux["xbm/pos_pairs"]) == 0 and float(aux["loss_xbm"]) == 0.0
  np.testing.assert_allclose(total, oracle.contrastive(e, l, e, l), rtol=1e-5)
  np.testing.assert_array_equal(new_mem.ptr, mem.ptr)  # nothing enqueued
  _, _, on = run(5)
  assert int(on["xbm/pos_pairs"]) > 0  # the same memory, switched on, has pairs
  cond = [x for x in jax.make_jaxpr(run)(4).jaxpr.eqns if x.primitive.name == "cond"]
  assert len(cond) == 1
  branches = [_memory_products(b.jaxpr) for b in cond[0].params["branches"]]
  assert sorted(branches)[0] == 0 and sorted(branches)[1] > 0  # false: none; true: S = q M^T
