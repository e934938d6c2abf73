"""Checkpoints with orbax: the whole train state (memory and pointer included) plus
a JSON side-car for host state (pipeline position, controllers, drift snapshots).

Two managers under `workdir/checkpoints`: `last/` keeps the newest N, `best/`
keeps the one with the best eval metric. Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-save leaves the
previous checkpoint as the latest (and orbax removes the temporary one on the next
start). Each save is read back and its files' sizes and CRC-32s recorded
(`integrity`); a restore takes the newest checkpoint that still matches them and
reads, moving each damaged newer one to `checkpoints/damaged/`. A write that fails
(no space, read-only, quota) is one line naming the step, the path and the newest
intact checkpoint (`WriteError`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from xbm_jax.train import integrity
from xbm_jax.train.errors import ConfigError, ResumeError, WriteError

log = logging.getLogger("xbm_jax.train")


def _to_json(x):
  if isinstance(x, dict):
    return {k: _to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  if isinstance(x, np.ndarray):
    return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
  if isinstance(x, np.generic):
    return x.item()
  return x


def _from_json(x):
  if isinstance(x, dict):
    if "__ndarray__" in x:
      return np.asarray(x["__ndarray__"], dtype=x["dtype"])
    return {k: _from_json(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_json(v) for v in x]
  return x


def _handlers():
  return {"state": ocp.StandardCheckpointHandler(), "host": ocp.JsonCheckpointHandler()}


def _shapes(tree, skip=("memory", "ptr")) -> list:
  """The sorted (shape, dtype) of a tree's arrays (the memory pointer, whose shape is
  the device count of a sharded memory, left out): what a config fixes."""
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if keys[-2:] != skip and getattr(leaf, "shape", None) is not None:
      out.append((tuple(leaf.shape), str(np.dtype(leaf.dtype))))
  return sorted(out)


class Checkpointer:
  """Save / restore `(TrainState, host_state)`; automatic resume from the workdir."""

  def __init__(self, workdir: str, *, keep: int = 2, best_metric: str = ""):
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.workdir = os.path.abspath(workdir)
    self.best_metric = best_metric
    self.last = ocp.CheckpointManager(
      _last_dir(workdir),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
      ),
      item_handlers=_handlers(),
    )
    self.best = None
    if best_metric:
      self.best = ocp.CheckpointManager(
        os.path.join(root, "best"),
        options=ocp.CheckpointManagerOptions(
          max_to_keep=1,
          create=True,
          best_fn=lambda m: m[best_metric],
          best_mode="max",
          enable_async_checkpointing=False,
          cleanup_tmp_directories=True,
        ),
        item_handlers=_handlers(),
      )

  def latest_step(self) -> Optional[int]:
    return self.last.latest_step()

  @staticmethod
  def _args(state, host_state):
    return ocp.args.Composite(
      state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(_to_json(host_state))
    )

  def save(self, step: int, state, host_state: dict) -> None:
    if self.last.latest_step() == step:
      return
    self._write(self.last, step, self._args(state, host_state))

  def save_best(self, step: int, state, host_state: dict, metrics: dict) -> None:
    if self.best is None or self.best_metric not in metrics:
      return
    metrics = {self.best_metric: float(metrics[self.best_metric])}
    self._write(self.best, step, self._args(state, host_state), metrics=metrics)

  def _write(self, manager, step: int, args, **kwargs) -> None:
    """Saves, reads the metadata back and records the files (`integrity`); a write
    the OS refuses (no space, read-only, quota) is one line (`WriteError`) naming
    the newest intact checkpoint, which stays the latest: orbax finalises a step
    only once complete."""
    step_dir = os.path.join(str(manager.directory), str(step))
    try:
      with integrity.orbax_thread_errors_dropped():
        manager.save(step, args=args, **kwargs)
        manager.wait_until_finished()
      if step in manager.all_steps():  # `best/` keeps only a better one
        manager.item_metadata(step)
        if jax.process_index() == 0:
          integrity.write_digest(step_dir)
    except Exception as e:  # pylint: disable=broad-except
      why = integrity.write_failure(e)
      if why is None:
        raise
      raise WriteError(
        f"cannot write the checkpoint of step {step} to {step_dir}: {why}; "
        + integrity.resume_hint(self.workdir)
      ) from e

  def restore(self, abstract_state, step: Optional[int] = None) -> Optional[tuple[Any, dict]]:
    """The state at `step` (default: latest), laid out like `abstract_state`
    (a pytree of `jax.ShapeDtypeStruct` with shardings), or None if none saved.
    A checkpoint whose train state has other fields (another version's, or another
    set of options) is refused first (`check_fields`)."""
    step = self.last.latest_step() if step is None else step
    if step is None:
      return None
    self.check_fields(abstract_state, step)
    out = self.last.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore()
      ),
    )
    return out["state"], _from_json(out["host"])

  def restore_newest(self, read, abstract_state) -> Optional[tuple[Any, dict]]:
    """`read(step)` of the newest checkpoint that is intact, or None if none is saved.

    A checkpoint whose files differ from those recorded at its save, or whose
    metadata or data fail to read while it fits `abstract_state` (the same arrays),
    is damaged: once an older one reads, each damaged one is moved to
    `checkpoints/damaged/` (never deleted) with a WARNING. One that does not fit
    (another config or version) is refused (ResumeError), as is a workdir whose
    checkpoints are all damaged (naming those tried; nothing is moved)."""
    damaged = []
    for step in sorted(self.last.all_steps(), reverse=True):
      step_dir = os.path.join(str(self.last.directory), str(step))
      problem = integrity.check_digest(step_dir)
      if not problem:
        try:
          self._check_fits(abstract_state, step)
          restored = read(step)
        except ResumeError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          problem = integrity.first_line(e)
        else:
          self._move_aside(damaged)
          return restored
      damaged.append((step, step_dir, problem))
    if damaged:
      tried = "; ".join(f"step {s} ({p})" for s, _, p in damaged)
      raise ResumeError(
        f"no intact checkpoint in {self.last.directory}: tried {tried}; use a new "
        "--workdir, or move checkpoints/last away to start this one over"
      )
    return None

  def _check_fits(self, abstract_state, step: int) -> None:
    """ResumeError (one line) unless the checkpoint at `step` holds `abstract_state`'s
    fields and arrays; unreadable metadata raises as it is (damage)."""
    saved = self.last.item_metadata(step)["state"]
    try:
      self.check_fields(abstract_state, step)
      mine, theirs = _shapes(abstract_state), _shapes(dict(getattr(saved, "tree", saved)))
      if mine != theirs:
        diff = sorted(set(theirs) ^ set(mine))[:2]
        raise ValueError(f"its arrays differ from this run's, e.g. (shape, dtype) {diff}")
    except ValueError as e:
      raise ResumeError(
        f"cannot restore the checkpoint at step {step} in {self.workdir} with "
        f"this config ({integrity.first_line(e)}); use a new --workdir"
      ) from e

  def _move_aside(self, damaged: list) -> None:
    """Moves the damaged checkpoints out of orbax's sight (process 0; the others
    wait for it), each named in a WARNING."""
    if not damaged:
      return
    if jax.process_index() == 0:
      for step, step_dir, problem in damaged:
        dest = integrity.move_aside(step_dir)
        log.warning("checkpoint at step %d is damaged (%s); moved to %s", step, problem, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices("xbm_jax:damaged_checkpoints_moved")
    self.last.reload()

  def check_fields(self, state, step: int) -> None:
    """Raises ValueError (one line) unless the checkpoint at `step` holds a train
    state with `state`'s fields, each present (with arrays) or empty alike: a
    checkpoint of an earlier version (e.g. with the `rng` it no longer keeps) or
    saved with another option that adds state would otherwise fail deep in orbax."""
    saved = self.last.item_metadata(step)["state"]
    saved = dict(getattr(saved, "tree", saved))
    mine = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    has = lambda x: bool(jax.tree.leaves(x))
    extra, missing = sorted(set(saved) - set(mine)), sorted(set(mine) - set(saved))
    differ = sorted(k for k in set(saved) & set(mine) if has(saved[k]) != has(mine[k]))
    problems = []
    if extra:
      problems.append(f"field(s) {extra} that this version does not keep")
    if missing:
      problems.append(f"no field(s) {missing}")
    if differ:
      problems.append(f"field(s) {differ} set where this run's are empty, or the reverse")
    if problems:
      raise ValueError(
        f"its train state has {'; '.join(problems)} (written by another version of "
        "xbm_jax or with other options); its params can still warm-start a new run "
        "(config.train.init_from)"
      )

  def saved_memory_ptr_shape(self, step: Optional[int] = None) -> Optional[tuple]:
    """Shape of the saved memory pointer: `()` replicated, `(n,)` sharded over n."""
    step = self.last.latest_step() if step is None else step
    if step is None:
      return None
    return tuple(self.last.item_metadata(step)["state"]["memory"]["ptr"].shape)

  def restore_resharded(self, state, mesh, step: Optional[int] = None):
    """Restores a sharded memory saved on another device count onto `state`'s layout
    (a sharded memory on `mesh`), shard by shard: orbax reads into each device only
    the block of saved rows its new shard's place covers (the new shardings cut the
    saved arrays into contiguous blocks), and `sharded_memory.reshard_on_mesh` re-lays
    the blocks on the devices into `sharded_memory.reshard`'s order. A process
    reads and stages only its own devices' blocks, and a device peaks at about 3
    shards (benchmarks/reshard_restore.py measures both); the whole memory is
    never gathered. The rest of the state is restored straight onto its
    shardings."""
    from xbm_jax.memory import sharded as sm

    abstract = abstract_like(state)
    if abstract.memory.ptr.ndim != 1:
      raise ValueError("restore_resharded restores onto a sharded memory (ptr [n])")
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    ptr_shape = self.saved_memory_ptr_shape(step)
    ptr = jax.ShapeDtypeStruct(ptr_shape, jax.numpy.int32, sharding=replicated)
    restored = self.restore(abstract.replace(memory=abstract.memory._replace(ptr=ptr)), step)
    if restored is None:
      return None
    st, host = restored
    memory = sm.reshard_on_mesh(st.memory, jax.device_get(st.memory.ptr), mesh)
    return st.replace(memory=memory), host

  def close(self) -> None:
    self.last.close()
    if self.best is not None:
      self.best.close()


def abstract_like(state):
  """ShapeDtypeStructs (with shardings) of a concrete state, for restore."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


PARAM_KEYS = ("params", "batch_stats")


def _last_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints", "last")


def saved_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints in `workdir`, oldest first, read from the
  folder names alone (orbax renames a checkpoint's temporary folder to its step
  when it is complete); nothing is created."""
  last = _last_dir(workdir)
  return sorted(int(d) for d in os.listdir(last) if d.isdigit()) if os.path.isdir(last) else []


def read_params(workdir: str) -> tuple[int, dict]:
  """`(step, {"params", "batch_stats"})` of the latest checkpoint in another run's
  `workdir`, as host numpy arrays.

  Only those two subtrees are read (not the memory, the optimiser state or the host
  state), whatever devices or processes saved them, and nothing is created or
  written in `workdir` (no CheckpointManager is opened there).
  """
  steps = saved_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{workdir} has no checkpoint (no checkpoints/last/<step>)")
  path = epath.Path(_last_dir(workdir)) / str(steps[-1]) / "state"
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(path).tree
    wanted = {k: tree[k] for k in PARAM_KEYS}
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    out = handler.restore(
      path, args=ocp.args.PyTreeRestore(item=wanted, restore_args=as_numpy, partial_restore=True)
    )
  finally:
    handler.close()
  return steps[-1], {k: out[k] for k in PARAM_KEYS}


def write_params(out: str, variables: dict, step: int) -> None:
  """Writes `variables["params"]` and `["batch_stats"]` (+ `step`) to a small
  msgpack file, atomically (`load_params` reads it; `train.init_from` takes it)."""
  from flax import serialization  # pylint: disable=g-import-not-at-top

  tree = {k: variables[k] for k in PARAM_KEYS}
  blob = serialization.msgpack_serialize(
    jax.tree.map(np.asarray, {**tree, "step": np.asarray(step)})
  )
  tmp = out + ".tmp"
  with open(tmp, "wb") as f:
    f.write(blob)
  os.replace(tmp, out)


def export_params(workdir: str, out: str) -> int:
  """Writes the latest checkpoint's params and batch_stats of `workdir` to `out`
  (`write_params`), reading only those; returns the step exported."""
  step, variables = read_params(workdir)
  write_params(out, variables, step)
  return step


def load_params(path: str) -> dict:
  """`{"params", "batch_stats"}` from `write_params`' file."""
  from flax import serialization  # pylint: disable=g-import-not-at-top

  if not os.path.exists(path):
    raise FileNotFoundError(f"no parameter file {path}")
  with open(path, "rb") as f:
    return serialization.msgpack_restore(f.read())


def _misfit(mine, theirs) -> str:
  """How a source's variables differ from this model's ("" when they fit): another
  tree, or the first leaf of another shape (e.g. another embed_dim)."""
  if jax.tree.structure(mine) != jax.tree.structure(theirs):
    return "another tree of variables"
  for (path, m), t in zip(jax.tree_util.tree_leaves_with_path(mine), jax.tree.leaves(theirs)):
    if np.shape(t) != m.shape:
      return f"{jax.tree_util.keystr(path)} is {np.shape(t)}, this model's {m.shape}"
  return ""


def warm_start(state, source: str):
  """`state` with the params and BN statistics of another run's latest checkpoint
  (whatever its memory size; only those two are read) or of an exported
  `.msgpack`, placed like this run's (and the momentum encoder, if any, a copy of
  them). A source that does not fit the model: ConfigError naming the leaf."""
  if source.endswith(".msgpack"):  # exported with scripts/export_params.py
    raw = load_params(source)
  else:
    raw = read_params(source)[1]
  out = {}
  for key in PARAM_KEYS:
    mine, theirs = getattr(state, key), raw[key]
    misfit = _misfit(mine, theirs)
    if misfit:
      raise ConfigError(
        f"config.train.init_from={source!r}: its {key} do not match this model "
        f"({misfit}; different config.model?)"
      )
    out[key] = jax.tree.map(
      lambda m, t: jax.device_put(np.asarray(t, m.dtype), m.sharding), mine, theirs
    )
  key_encoder = getattr(state, "key_encoder", None)
  if key_encoder is not None:  # the momentum encoder starts as a copy, as MoCo's
    out["key_encoder"] = jax.tree.map(
      lambda m, t: jax.device_put(np.asarray(t, m.dtype), m.sharding),
      key_encoder,
      key_encoder._replace(params=raw["params"], batch_stats=raw["batch_stats"]),
    )
  return state.replace(**out)
