"""The ring buffer against a Python list model; the XBM total-loss helper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xbm_jax
from tests.helpers import loss_oracles
from xbm_jax import losses, memory


class ListModel:
  """The specification: a list of (vector, label) slots written round-robin."""

  def __init__(self, size):
    self.slots = [None] * size
    self.ptr = 0

  def enqueue(self, emb, labels, mask=None):
    for i, (e, l) in enumerate(zip(emb, labels)):
      if mask is None or mask[i]:
        self.slots[self.ptr] = (e, int(l))
        self.ptr = (self.ptr + 1) % len(self.slots)


def check_equal(mem, model):
  valid = np.asarray(mem.valid)
  for k, slot in enumerate(model.slots):
    assert valid[k] == (slot is not None), k
    if slot is not None:
      np.testing.assert_array_equal(np.asarray(mem.emb[k]), slot[0])
      assert int(mem.labels[k]) == slot[1]
  assert int(mem.ptr) == model.ptr


@pytest.mark.parametrize("size,batch", [(10, 3), (12, 4), (7, 7), (5, 1)])
def test_ring_buffer_matches_list_model(size, batch):
  rng = np.random.default_rng(size * 100 + batch)
  mem = memory.init(size=size, dim=4)
  model = ListModel(size)
  enqueue = jax.jit(memory.enqueue)
  for _ in range(3 * size // batch + 2):  # several wrap-arounds
    emb = rng.normal(size=(batch, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=batch)  # label 0 is ordinary
    mem = enqueue(mem, xbm_jax.Embeddings(jnp.asarray(emb), jnp.asarray(labels)))
    model.enqueue(emb, labels)
    check_equal(mem, model)
  assert float(memory.fill(mem)) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("size,batch", [(10, 3), (7, 7), (6, 4)])
def test_masked_enqueue_matches_list_model(size, batch):
  """Only the selected rows enter, in order, at consecutive slots: a true ring
  (the oldest selected rows are overwritten first), through several wraps, with
  empty and full masks; next_slots names each row's slot beforehand."""
  rng = np.random.default_rng(size * 10 + batch)
  mem = memory.init(size=size, dim=4)
  model = ListModel(size)
  enqueue = jax.jit(lambda m, b, mask: memory.enqueue(m, b, mask=mask))
  for step in range(4 * size // batch + 3):
    emb = rng.normal(size=(batch, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=batch)
    mask = rng.random(batch) < 0.6
    mask[:] = {0: False, 1: True}.get(step, mask)  # an empty and a full mask
    slots = np.asarray(memory.next_slots(mem, batch, mask=jnp.asarray(mask)))
    expect, ptr = [], model.ptr
    for m in mask:
      expect.append(ptr if m else -1)
      ptr = (ptr + 1) % size if m else ptr
    assert slots.tolist() == expect
    mem = enqueue(mem, xbm_jax.Embeddings(jnp.asarray(emb), jnp.asarray(labels)), jnp.asarray(mask))
    model.enqueue(emb, labels, mask)
    check_equal(mem, model)


@pytest.mark.slow
def test_label_zero_and_fill():
  mem = memory.init(size=6, dim=2)
  assert float(memory.fill(mem)) == 0.0
  b = xbm_jax.Embeddings(jnp.ones((2, 2)), jnp.zeros((2,), jnp.int32))
  mem = memory.enqueue(mem, b)
  assert float(memory.fill(mem)) == pytest.approx(2 / 6)
  assert np.asarray(mem.valid).tolist() == [True, True, False, False, False, False]


def test_invalid_rows_take_slots_but_stay_invalid():
  mem = memory.init(size=4, dim=2)
  b = xbm_jax.Embeddings(jnp.ones((3, 2)), jnp.arange(3), jnp.array([True, False, True]))
  mem = memory.enqueue(mem, b)
  assert np.asarray(mem.valid).tolist() == [True, False, True, False]
  assert int(mem.ptr) == 3


@pytest.mark.slow
def test_when_false_leaves_memory_unchanged_in_one_program():
  mem = memory.init(size=8, dim=3)
  b = xbm_jax.Embeddings(jnp.ones((3, 3)), jnp.arange(3))
  traces = []  # the Python body runs once per compilation
  f = jax.jit(lambda m, w: traces.append(1) or memory.enqueue(m, b, when=w))
  same = f(mem, False)
  jax.tree.map(np.testing.assert_array_equal, same, mem)
  moved = f(mem, True)
  assert int(moved.ptr) == 3 and int(memory.fill(moved) * 8) == 3
  assert len(traces) == 1


def test_stop_gradient_and_dtype():
  mem = memory.init(size=4, dim=2, dtype=jnp.bfloat16)

  def f(e):
    m = memory.enqueue(mem, xbm_jax.Embeddings(e, jnp.arange(2)))
    assert m.emb.dtype == jnp.bfloat16
    return jnp.sum(m.emb.astype(jnp.float32))

  assert np.all(np.asarray(jax.grad(f)(jnp.ones((2, 2)))) == 0)


def test_bad_enqueue_is_a_clear_error_at_trace_time():
  mem = memory.init(size=4, dim=2)
  with pytest.raises(ValueError, match="larger than the memory"):
    jax.jit(memory.enqueue)(mem, xbm_jax.Embeddings(jnp.ones((5, 2)), jnp.arange(5)))
  with pytest.raises(ValueError, match="dim"):
    memory.enqueue(mem, xbm_jax.Embeddings(jnp.ones((2, 3)), jnp.arange(2)))
  with pytest.raises(ValueError, match="positive"):
    memory.init(size=0, dim=2)


def test_last_slots_are_the_written_slots():
  mem = memory.init(size=5, dim=2)
  for _ in range(3):  # ptr: 0 -> 3 -> 1 (wrapped) -> 4
    mem = memory.enqueue(mem, xbm_jax.Embeddings(jnp.ones((3, 2)), jnp.arange(3)))
  assert np.asarray(memory.last_slots(mem, 3)).tolist() == [1, 2, 3]


def unit_batch(seed, b=8, d=16, classes=3):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return xbm_jax.Embeddings(
    jnp.asarray(x, jnp.float32), jnp.asarray(rng.integers(0, classes, b), jnp.int32)
  )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_memory_of_batch_size_equals_in_batch_loss(name):
  """Sanity (PML's test_sanity_check): memory size == batch, one enqueue."""
  b = unit_batch(0)
  mem = memory.enqueue(memory.init(size=8, dim=16), b)
  fn = losses.get(name)
  np.testing.assert_allclose(float(fn(b, mem)), float(fn(b, b)), rtol=1e-6)


def test_start_rule_matches_the_reference_iteration_count():
  """The reference: `iteration += 1; if iteration > START_ITERATION: use memory`."""
  start = 3
  uses, iteration = [], 0
  for step in range(6):  # 0-based update index, as TrainState.step
    iteration += 1
    uses.append(iteration > start)
    assert memory.active(step, start) == uses[-1]
    assert bool(jax.jit(memory.active)(jnp.int32(step), jnp.int32(start))) == uses[-1]
  assert uses.index(True) == start


def test_total_loss_gates_on_start_step_and_compiles_once():
  b = unit_batch(1)
  mem0 = memory.init(size=32, dim=16)

  traces = []

  @jax.jit
  def step(e, mem, t):
    traces.append(1)  # once per compilation
    q = xbm_jax.Embeddings(e, b.labels)
    return losses.xbm_total_loss(q, q, mem, step=t, start_step=5, weight=0.5)

  # The oracle: NumPy loops over pairs; at step 5 the memory holds exactly this batch.
  e, lab = np.asarray(b.emb, np.float64), np.asarray(b.labels)
  in_batch = loss_oracles.contrastive(e, lab, e, lab)
  mem_only = loss_oracles.contrastive(e, lab, e, lab)
  loss, mem1, aux = step(b.emb, mem0, 4)
  np.testing.assert_allclose(float(loss), in_batch, rtol=1e-6)  # memory off
  assert int(mem1.ptr) == 0 and float(aux["xbm_weight"]) == 0.0
  loss, mem2, aux = step(b.emb, mem0, 5)
  assert int(mem2.ptr) == 8  # enqueued first
  np.testing.assert_allclose(float(loss), in_batch + 0.5 * mem_only, rtol=1e-6)
  np.testing.assert_allclose(float(aux["loss_xbm"]), mem_only, rtol=1e-6)
  assert len(traces) == 1


@pytest.mark.slow
def test_total_loss_gradients_memory_term_to_anchors_only():
  """The gradient reaches the memory term's anchors only: against float64 central
  differences of the NumPy oracle, with the memory (old rows + this batch, enqueued
  first) held fixed while the batch term moves both of its sides."""
  b = unit_batch(2)
  old = unit_batch(3, b=24)
  mem = memory.enqueue(memory.init(size=32, dim=16), old)

  def total(e):
    q = xbm_jax.Embeddings(e, b.labels)
    return losses.xbm_total_loss(q, q, mem, step=1, start_step=0)[0]

  got = np.asarray(jax.grad(total)(b.emb), np.float64)
  e0, lab = np.asarray(b.emb, np.float64), np.asarray(b.labels)
  m_emb = np.concatenate([np.asarray(old.emb, np.float64), e0])
  m_lab = np.concatenate([np.asarray(old.labels), lab])

  def oracle(e):
    return loss_oracles.contrastive(e, lab, e, lab) + loss_oracles.contrastive(e, lab, m_emb, m_lab)

  want, h = np.zeros_like(e0), 1e-6  # small enough that no pair crosses a threshold
  for i, d in np.ndindex(*e0.shape):
    up, down = e0.copy(), e0.copy()
    up[i, d] += h
    down[i, d] -= h
    want[i, d] = (oracle(up) - oracle(down)) / (2 * h)
  np.testing.assert_allclose(got, want, atol=2e-4)
