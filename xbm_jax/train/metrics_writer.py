"""One metric writer: ``metrics.jsonl`` plus TensorBoard event files.

Names are stable across the project (``train/loss``, ``train/loss_xbm``,
``train/drift@100``, ``eval/sop/recall@1``, ...). Each :meth:`MetricWriter.write_scalars`
call appends one JSON line ``{"step": int, "<name>": float, ...}`` and the same scalars to
the TensorBoard event file, written by ``tensorboardX`` (maintained, pinned, and needs no
TensorFlow).

Resuming: pass ``resume_step`` (the restored checkpoint's step, -1 for a fresh start).
Lines of ``metrics.jsonl`` with a larger step were written after that checkpoint and are
replayed by the resumed run, so they are dropped (a torn last line too: a kill or a full
disk mid-write, whatever bytes it left). Event
files are never rewritten: a new file starts with a ``SessionLog.START`` at
``resume_step + 1`` (tensorboardX's ``purge_step``), from which TensorBoard purges the
orphaned later events itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Mapping, Optional

import numpy as np
from tensorboardX import FileWriter, summary as tb_summary
from tensorboardX.proto import event_pb2, summary_pb2

from xbm_jax.insight.run_files import CONFIG_FILE, METRICS_FILE
from xbm_jax.train import integrity
from xbm_jax.train.errors import WriteError


def _to_float(name: str, value: Any) -> float:
  try:
    return float(np.asarray(value).reshape(()))
  except (TypeError, ValueError) as e:
    raise ValueError(f"metric {name!r} is not a scalar number: {value!r}") from e


def _jsonable(obj):
  if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
    obj = obj.to_dict()
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.generic, np.ndarray)):
    return obj.tolist()
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  return str(obj)


def truncate_jsonl(path: str, max_step: int) -> int:
  """Drops lines with ``step > max_step`` (and unparsable ones, e.g. a line cut short
  by a crash) from ``path``, atomically. Returns the number of lines dropped."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  # A torn line may end inside whatever bytes the disk kept: replaced, never fatal.
  with open(path, errors="replace") as f:
    for line in f:
      try:
        rec = json.loads(line)
        keep = int(rec["step"]) <= max_step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


def config_json(config: Any) -> dict:
  """The config as ``config.json`` holds it (tuples as lists), for comparisons."""
  return json.loads(json.dumps(_jsonable(config)))


class MetricWriter:
  """Writes ``<workdir>/metrics.jsonl`` and ``<workdir>/events.out.tfevents.*``.

  Args:
    workdir: the run folder (created if missing).
    resume_step: the step training resumes from; later JSONL lines are dropped and a
      TensorBoard restart marker is written (see module doc). None: plain append.
    enabled: False makes every call a no-op (non-zero hosts of a multi-host run).
    tensorboard: also write the event file.
  """

  def __init__(
    self,
    workdir: str,
    *,
    resume_step: Optional[int] = None,
    enabled: bool = True,
    tensorboard: bool = True,
  ):
    self.workdir = workdir
    self.enabled = enabled
    self._jsonl = self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    if resume_step is not None:
      truncate_jsonl(path, int(resume_step))
    self._jsonl = open(path, "a")
    if tensorboard:
      # tensorboardX names files by the second and host only: a pid and a clock in
      # the suffix keep a quick restart from reopening (and clobbering) the last file.
      self._tb = FileWriter(workdir, filename_suffix=f".{os.getpid()}.{time.time_ns()}.xbm")
      if resume_step is not None:
        # SessionLog START: TensorBoard purges the older files' events from here on.
        self._tb.add_event(
          event_pb2.Event(
            step=int(resume_step) + 1,
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
          )
        )

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends ``{"step": step, **scalars}`` (values cast to float; NaN/inf are kept
    and written as JSON ``NaN`` / ``Infinity``, which Python's json reads back)."""
    if not self.enabled or not scalars:
      return
    step = int(step)
    values = {}
    for name, v in scalars.items():
      if not isinstance(name, str) or name == "step":
        raise ValueError(f"bad metric name {name!r} (a str other than 'step')")
      values[name] = _to_float(name, v)
    with self._refused(step):
      self._write(step, values)

  @contextlib.contextmanager
  def _refused(self, step: int):
    """A write the OS refuses (no space, read-only, quota) as one line naming the
    step, the file and where the run resumes (`WriteError`)."""
    try:
      yield
    except OSError as e:
      why = integrity.write_failure(e) or str(e)
      path = os.path.join(self.workdir, METRICS_FILE)
      raise WriteError(
        f"cannot write the metrics of step {step} to {path}: {why}; "
        + integrity.resume_hint(self.workdir)
      ) from e

  def _write(self, step: int, values: dict) -> None:
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    if self._tb is not None:
      # Raw Summary values keep the project's tag names (tensorboardX's add_scalar
      # would rewrite "recall@1" to "recall_1").
      self._tb.add_summary(
        summary_pb2.Summary(
          value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        ),
        global_step=step,
      )
    # Flush per call (every few steps, not every step): a crash loses nothing
    # that the checkpoint does not also lose.
    self.flush()

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """Logs uint8 ``[H, W]`` or ``[H, W, C]`` (C = 1, 3, 4) as a PNG image summary."""
    if not self.enabled or self._tb is None:
      return
    img = np.asarray(image)
    if (
      img.dtype != np.uint8
      or img.ndim not in (2, 3)
      or (img.ndim == 3 and img.shape[-1] not in (1, 3, 4))
    ):
      raise ValueError(
        f"image {name!r} must be uint8 [H, W] or [H, W, 1|3|4], got {img.dtype} {img.shape}"
      )
    if img.ndim == 3 and img.shape[-1] == 1:
      img = img[..., 0]
    self._tb.add_summary(
      tb_summary.image(name, img, dataformats="HW" if img.ndim == 2 else "HWC"),
      global_step=int(step),
    )
    self._tb.flush()

  def write_text(self, step: int, name: str, text: str) -> None:
    """Logs a string for TensorBoard's text tab (event file only)."""
    if self.enabled and self._tb is not None:
      self._tb.add_summary(tb_summary.text(name, str(text)), global_step=int(step))

  def write_config(self, config: Any) -> None:
    """Saves ``config`` (dict or ConfigDict) as ``<workdir>/config.json`` (atomic)
    and as a text summary ``config`` at step 0."""
    if not self.enabled:
      return
    blob = json.dumps(_jsonable(config), indent=2, sort_keys=True)
    path = os.path.join(self.workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
      f.write(blob + "\n")
    os.replace(path + ".tmp", path)
    self.write_text(0, "config", "```\n" + blob + "\n```")

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    # Every row was flushed when written (a refused one raised then); on a full disk
    # the rest of TensorBoard's buffer cannot be written either, and raising here
    # would hide the error that stopped the run.
    with contextlib.suppress(OSError):
      if self._jsonl is not None:
        self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
    self._jsonl = self._tb = None
    self.enabled = False

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
