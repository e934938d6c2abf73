"""Guards that keep a run from lying: one run per workdir, a resume only with the
config it was saved with, paths as the user meant them, and a word when training
collapses.

Each guard runs before the first step (or on the host between steps) and fails
with a `UserError` of one line.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from typing import Optional

import jax
import numpy as np

from xbm_jax.train import checkpoint, config as config_lib
from xbm_jax.train.errors import ResumeError, WorkdirLockedError
from xbm_jax.train.metrics_writer import config_json

log = logging.getLogger("xbm_jax.train")

# Settings that are file paths: `~` and `$VARS` are expanded (bash leaves `~`
# unexpanded after `--flag=`).
PATH_KEYS = ("input.data_dir", "train.init_from", "model.init_from")

# A change of these changes the shapes or structure of the saved state: restoring
# cannot work, so a resume refuses them outright.
SHAPE_KEYS = (
  "model.name",
  "model.embed_dim",
  "model.width",
  "model.pool",
  "xbm.enabled",
  "xbm.size",
  "xbm.dtype",
  "xbm.memory_sharding",
  "optim.name",
)
# Options whose state is in the train state only while they are above 0: turning one
# on or off adds or removes that state.
STATE_OPTION_KEYS = ("xbm.moments_ema", "xbm.momentum_encoder", "xbm.reprojection")
# Changes that do not touch the math of the run (where and how it runs, how often
# it reports): allowed on resume without asking.
FREE_KEYS = (
  "train.steps",
  "train.num_devices",
  "train.progress",
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.init_from",
  "train.allow_config_change",
  "input.data_dir",
  "input.worker_count",
  "input.eval_batch_size",
)
COLLAPSE_COSINE = 0.99


def expand_path(path):
  """`~` and environment variables expanded; None stays None."""
  if not path:
    return path
  return os.path.expandvars(os.path.expanduser(str(path)))


def expand_paths(config) -> None:
  """Expands every path setting of `config` in place."""
  for key in PATH_KEYS:
    head, tail = key.split(".")
    if head in config and tail in config[head]:
      config[head][tail] = expand_path(config[head][tail])


class WorkdirLock:
  """An exclusive `flock` on `<workdir>/.lock` (one per process of a run).

  The kernel drops the lock when its holder dies, so a run killed with -9 never
  blocks its restart; the file only records who held it last, for the message.
  """

  def __init__(self, workdir: str, process_index: int = 0):
    name = ".lock" if process_index == 0 else f".lock.p{process_index}"
    self.workdir, self.path, self._fd = workdir, os.path.join(workdir, name), None

  def acquire(self) -> "WorkdirLock":
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise WorkdirLockedError(
        f"workdir {self.workdir} is in use by another run ({holder}); wait for it to "
        "finish or use another --workdir"
      ) from None
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}".encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _flatten(d, prefix="") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(saved: dict, current: dict) -> dict:
  """`{dotted key: (saved value, current value)}` for every key that differs
  (a key missing on one side shows as None there). Both are JSON-like dicts."""
  a, b = _flatten(saved), _flatten(current)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _shape_changing(key: str, config_now: dict) -> bool:
  if key in SHAPE_KEYS:
    return True
  # Without the memory, the state still holds a batch-sized one.
  return key == "input.batch_size" and not config_now["xbm"]["enabled"]


def _toggles_state(key: str, change: tuple) -> bool:
  """Whether the change turns a STATE_OPTION_KEYS option on or off (unset: off)."""
  return key in STATE_OPTION_KEYS and len({float(v or 0) > 0 for v in change}) > 1


def _stores_ids(cfg: dict) -> bool:
  """Whether a saved (JSON) config's memory stores image ids (`setup.memory_stores_ids`:
  the memory term's self_exclusion is "id"), which adds a leaf to the saved state."""
  own = (cfg.get("xbm", {}).get("memory_loss_kwargs") or {}).get("self_exclusion")
  return (own or (cfg.get("loss", {}).get("kwargs") or {}).get("self_exclusion")) == "id"


def check_resume(saved: Optional[dict], current: dict, *, allow_change: bool) -> dict:
  """Compares the config a checkpoint was written with to this run's.

  Returns every change (to log). Raises ResumeError naming the keys when one
  changes the saved state's shapes, or when others outside FREE_KEYS change and
  `allow_change` is False.
  """
  if saved is None:
    return {}
  diff = config_diff(saved, current)
  # A key the trainer gained since the checkpoint, at its default, changes nothing.
  old, defaults = _flatten(saved), _flatten(config_json(config_lib.base()))
  diff = {k: v for k, v in diff.items() if k in old or v[1] != defaults.get(k)}
  shaped = [k for k in diff if _shape_changing(k, current) or _toggles_state(k, diff[k])]
  if _stores_ids(saved) != _stores_ids(current):
    shaped += [k for k in diff if k.endswith(".self_exclusion")]
  if shaped:
    raise ResumeError(
      "cannot resume: the checkpoint was saved with a different "
      + _describe(diff, shaped)
      + " (this changes the saved state's shapes); use a new --workdir"
    )
  strict = [k for k in diff if k not in FREE_KEYS and not k.startswith("evals.")]
  if strict and not allow_change:
    raise ResumeError(
      "resuming with a changed config: "
      + _describe(diff, strict)
      + "; pass --config.train.allow_config_change=True to resume anyway, or use a new "
      "--workdir"
    )
  return diff


def _describe(diff: dict, keys) -> str:
  return ", ".join(f"{k} ({diff[k][0]!r} -> {diff[k][1]!r})" for k in keys)


def read_saved_config(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def mean_pairwise_cosine(emb: np.ndarray) -> float:
  """Mean cosine similarity over all pairs i != j of the rows of `[N, D]` `emb`.

  From `|sum_i e_i|^2 = sum_i |e_i|^2 + sum_{i != j} e_i . e_j` with unit rows:
  O(N D), no N x N matrix.
  """
  e = np.asarray(emb, np.float64)
  n = e.shape[0]
  if n < 2:
    return float("nan")
  e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
  total = np.sum(e.sum(axis=0) ** 2) - np.sum(e * e)
  return float(total / (n * (n - 1)))


class CollapseWatch:
  """Warns (once each) when training has stalled or collapsed without failing:
  a zero gradient norm, or probe embeddings all pointing the same way."""

  def __init__(self):
    self.warned = set()

  def _warn(self, kind: str, msg: str) -> None:
    if kind not in self.warned:
      self.warned.add(kind)
      log.warning(msg)

  def grad_norm(self, step: int, value: float) -> None:
    if value == 0.0:
      self._warn(
        "grad",
        f"step {step}: the gradient norm is 0 - training has stalled "
        "(a collapsed model or a too large learning rate?)",
      )

  def probe(self, step: int, emb: np.ndarray) -> None:
    cos = mean_pairwise_cosine(emb)
    if cos > COLLAPSE_COSINE:
      self._warn(
        "collapse",
        f"step {step}: the embeddings have collapsed (mean pairwise "
        f"cosine {cos:.4f} on the drift probe); check the learning rate",
      )


def check_resume_config(config, workdir: str) -> str:
  """Refuses a resume with a config other than the saved one, unless allowed; then
  returns the changes as text to log ("" when none). Reads only: runs before the
  checkpoint manager, the writer or the data are opened."""
  steps = checkpoint.saved_steps(workdir)
  if not steps:
    return ""
  step = steps[-1]
  saved = read_saved_config(workdir)
  diff = check_resume(
    saved, config_json(config), allow_change=bool(config.train.allow_config_change)
  )
  if not diff:
    return ""
  text = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
  log.warning("resuming step %d with config changes: %s", step, text)
  if jax.process_index() == 0:  # keep the config the checkpoint was written with
    with open(os.path.join(workdir, f"config.step{step}.json"), "w") as f:
      json.dump(saved, f, indent=2, sort_keys=True)
  return text
