"""Checkpoint reads: a sharded memory restored onto another device count shard by
shard, and a checkpoint of another train-state tree refused in one line.

Oracles: `sharded_memory.reshard` on the whole saved memory as host arrays (the
host algorithm), the bytes of one new shard, and a hand-written tree of the former
version's fields. Cheap: a 2 MiB memory, two small compiles.
"""

import sys
import tracemalloc
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers.runs import ROOT
from xbm_jax import memory as memory_lib
from xbm_jax.memory import sharded as sharded_memory
from xbm_jax.parallel import DATA_AXIS
from xbm_jax.train import checkpoint, loop, state as state_lib
from xbm_jax.train.errors import ResumeError

sys.path.insert(0, f"{ROOT}/benchmarks")
import reshard_restore  # noqa: E402  pylint: disable=g-import-not-at-top

ROWS, DIM = 32768, 16


@pytest.mark.slow
def test_a_resharded_restore_reads_and_holds_one_shard_per_device(tmp_path):
  """8 -> 4 devices: the memory equals the host algorithm's re-lay, bit for bit;
  each device ends with its shard only; the re-lay needs ~3 shards per device;
  the host stages no more than the process's own shards (the former path read the
  whole memory to host arrays and re-laid it there: ~2.6x)."""
  saved, _ = reshard_restore.make_state(ROWS, DIM, 8, fill=True)
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(1, saved, {"note": 1})
  expected = sharded_memory.reshard(jax.device_get(saved.memory), 4)

  state, mesh = reshard_restore.make_state(ROWS, DIM, 4, fill=False)
  own_shards = sum(leaf.nbytes for leaf in jax.tree.leaves(state.memory))  # 1 process: all 4
  tracemalloc.start()
  got, host = ck.restore_resharded(state, mesh)
  jax.block_until_ready(got)
  staged = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  ck.close()

  assert host == {"note": 1}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.memory), expected)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got.params), saved.params)
  for leaf in jax.tree.leaves(got.memory):
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {leaf.shape[0] // 4}
  assert staged < 1.5 * own_shards, (staged, own_shards)
  rows = [state.memory.emb, state.memory.labels, state.memory.valid]
  program = sharded_memory.relayout_program(mesh, DATA_AXIS, 3)
  stats = program.lower(np.zeros(8, np.int32), *rows).compile().memory_analysis()
  per_device = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )
  assert per_device < 3.5 * own_shards / 4, (per_device, own_shards / 4)


@flax.struct.dataclass
class FormerTrainState:
  """The train state as an earlier version saved it: with a PRNG key."""

  step: Any
  params: Any
  batch_stats: Any
  opt_state: Any
  memory: Any
  rng: Any


def test_a_checkpoint_of_the_former_tree_is_refused_in_one_line(tmp_path):
  tx = optax.sgd(0.1)
  params = {"w": jnp.ones((3,))}
  mem = memory_lib.init(size=4, dim=2)
  old = FormerTrainState(jnp.int32(2), params, {}, tx.init(params), mem, jax.random.PRNGKey(0))
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(2, old, {})
  state = state_lib.create(params=params, batch_stats={}, tx=tx, memory=mem)
  mesh = jax.make_mesh((1,), (DATA_AXIS,), devices=jax.devices()[:1])
  with pytest.raises(ResumeError) as err:
    loop._restore(ck, state, mesh, sharded=False, workdir=str(tmp_path))
  msg = str(err.value)
  assert "['rng'] that this version does not keep" in msg and "\n" not in msg, msg
  assert "config.train.init_from" in msg
  ck.close()
