"""The terminal of a run: one progress bar whose ETA counts the evaluations still
to come, and one line per evaluation.

tqdm alone estimates from its step rate, so an evaluation (a pause of many steps'
time) first goes unpredicted and then, counted as one slow step, makes the ETA
jump. Here the bar's clock skips evaluations, and the ETA adds the mean time of
the evaluations so far for each one still due.
"""

from __future__ import annotations

import bisect
import time

import tqdm

BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def format_seconds(s: float) -> str:
  s = int(round(max(s, 0)))
  h, rest = divmod(s, 3600)
  return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
  """`update()` per step, `evaluated(seconds)` after each evaluation round.

  Args:
    total, start: steps of the run and the step it starts (resumes) from.
    eval_steps: the steps after which an evaluation runs.
    enabled: draw the bar and print (process 0 with config.train.progress).
  """

  def __init__(self, *, total: int, start: int, eval_steps, enabled: bool):
    self.enabled = enabled
    self.eval_steps = sorted(eval_steps)
    self.eval_seconds: list[float] = []
    self.bar = tqdm.tqdm(
      total=total,
      initial=start,
      disable=not enabled,
      unit="step",
      dynamic_ncols=True,
      bar_format=BAR_FORMAT,
    )
    self.fields: dict = {}

  def update(self) -> None:
    """One step done; the ETA is recomputed on every redraw, not only at log steps."""
    if self.enabled:
      self.bar.set_postfix(self._shown(), refresh=False)
    self.bar.update(1)

  def eta(self) -> float | None:
    """Seconds left: steps at the bar's rate, plus the evaluations still due."""
    rate = self.bar.format_dict.get("rate")
    if not rate:
      return None
    n = self.bar.n
    left = (self.bar.total - n) / rate
    if self.eval_seconds:
      due = len(self.eval_steps) - bisect.bisect_right(self.eval_steps, n)
      left += due * sum(self.eval_seconds) / len(self.eval_seconds)
    return left

  def _shown(self) -> dict:
    eta = self.eta()
    return dict(self.fields, eta=format_seconds(eta) if eta is not None else "?")

  def postfix(self, **fields) -> None:
    self.fields.update(fields)
    self.bar.set_postfix(self._shown(), refresh=True)

  def write(self, line: str) -> None:
    """A line above the bar (the bar is redrawn below it)."""
    if self.enabled:
      self.bar.write(line)

  def evaluated(self, seconds: float) -> None:
    self.eval_seconds.append(seconds)
    # The pause is not a step: keep it out of tqdm's smoothed step rate.
    self.bar.last_print_t = time.time()
    self.postfix()

  def close(self) -> None:
    self.bar.close()
