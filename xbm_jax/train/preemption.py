"""Stopping on SIGTERM or SIGINT at a step every process agrees on.

A scheduler preempting a job sends SIGTERM (and a user Ctrl-C, SIGINT); the run then
finishes the step it is in, checkpoints that step (the loop does) and exits with the
conventional status 128 + signal (143, 130), so a scheduler restarts it and the
restart resumes from that step. A second signal ends the process at once, by the
signal itself (the checkpoint being written, if any, is left as orbax's temporary
folder, which is never read and is removed on the next start).

One process: Python handlers note the signal; the loop asks after every step.
Several processes: every one must stop and save at the same step, which JAX's
preemption service agrees on (`multihost_utils.reached_preemption_sync_point`, as
big_vision, t5x and MaxText use it): its own SIGTERM handler, installed by
`jax.distributed.initialize`, tells every process; each keeps stepping until the
step all can reach. Its handler listens to SIGTERM only, so SIGINT is passed on to
it as a SIGTERM to this process, and the signal's name reaches the other processes
through JAX's key-value store (for the message and the exit status).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import numpy as np
from jax.experimental import multihost_utils

from xbm_jax.train.errors import Preempted

log = logging.getLogger("xbm_jax.train")
SIGNALS = (signal.SIGTERM, signal.SIGINT)
SIGNAL_KEY = "xbm_jax/stop_signal"
PENDING_KEY = "pending_metrics"


def _distributed_client():
  """JAX's distributed client when its preemption service runs (a multi-process
  run, or one started with a coordinator), else None. `multihost_utils` reads the
  same private state; there is no public accessor."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  state = distributed.global_state
  if state.client is None or state.preemption_sync_manager is None:
    return None
  return state.client


class StopSignals:
  """For a run's lifetime (a context manager): `reached(step)` after each step says
  whether to checkpoint and stop there; `signum` then names the signal."""

  def __init__(self):
    self.signum = None
    self._client = _distributed_client()
    self._previous = {}

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is not threading.main_thread():
      return self  # Python delivers signals to the main thread only
    for s in SIGNALS:
      if s == signal.SIGTERM and self._client is not None:
        continue  # JAX's preemption service owns SIGTERM
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:  # the second signal: end now, as the signal would
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    if self._client is not None:
      self._client.key_value_set(SIGNAL_KEY, str(signum), allow_overwrite=True)
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service

  def reached(self, step: int) -> bool:
    """Whether to checkpoint `step` and stop (called by every process after every
    step, with the same steps)."""
    if self._client is None:
      return self.signum is not None
    if not multihost_utils.reached_preemption_sync_point(step):
      return False
    try:
      self.signum = int(self._client.key_value_try_get(SIGNAL_KEY))
    except Exception:  # pylint: disable=broad-except
      self.signum = int(signal.SIGTERM)  # only JAX's handler saw it: a SIGTERM
    # From here on a further SIGTERM (during the save) ends the process at once.
    self._previous.setdefault(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, self._handle)
    return True


def stopped(step: int, signum: int) -> Preempted:
  """The exception that ends a run stopped at `step` (its checkpoint saved), with
  the line it logs."""
  name = signal.Signals(signum).name
  message = f"stopped at step {step} by {name}; checkpoint saved; run the same command to resume"
  log.warning(message)
  return Preempted(message, step=step, status=128 + int(signum))


def pending_state(pending: list) -> dict:
  """The step metrics not yet logged, for the host state of a checkpoint between two
  log steps: the resumed run logs their means as this one would have. Host arrays
  keep their dtype (`checkpoint._to_json`), so the means are the same bits."""
  return {
    PENDING_KEY: [
      [int(step), {k: np.asarray(v) for k, v in metrics.items()}] for step, metrics in pending
    ]
  }


def restore_pending(host: dict) -> list:
  """`pending_state`'s metrics from a restored host state (none: `[]`)."""
  return [(int(step), metrics) for step, metrics in host.get(PENDING_KEY, [])]
