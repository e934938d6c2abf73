"""Errors a user can fix (config, data, resume mismatch, a busy or full workdir), and
the stop on a preemption signal.

`scripts/train.py` prints such an error as one line and exits with status 2
(`--verbose`: the traceback); anything else is a bug and keeps its traceback. Each class also derives from the builtin
exception callers already catch (ValueError, KeyError, ...).
"""

from __future__ import annotations


class UserError(Exception):
  """A mistake the user can fix; its message alone says what and how."""


class ConfigError(UserError, ValueError):
  """The config cannot train (bad value, unknown key, inconsistent sizes)."""


class ConfigKeyError(ConfigError, KeyError):
  """An unknown config key (a typo)."""

  def __str__(self):  # KeyError would quote the whole message
    return str(self.args[0]) if self.args else ""


class DataError(UserError, FileNotFoundError):
  """The dataset is missing or unreadable."""


class ResumeError(UserError, ValueError):
  """The workdir's checkpoint was written with another config."""


class WorkdirLockedError(UserError, RuntimeError):
  """Another live run holds the workdir."""


class WorkdirError(UserError, OSError):
  """The workdir cannot be created or written (a file in the way, no permission)."""


class NonFiniteError(UserError, FloatingPointError):
  """Training produced NaN/inf (loss, gradients, updates, parameters or embeddings)."""


class WriteError(WorkdirError):
  """A write into the workdir failed mid-run (no space, read-only, quota): the run
  stopped; the workdir resumes from its newest intact checkpoint."""


class Preempted(SystemExit):
  """SIGTERM or SIGINT stopped the run after it checkpointed its step. A SystemExit
  with status 128 + signal (143 for SIGTERM), which a scheduler reads as preempted;
  `except Exception` lets it through, as it does KeyboardInterrupt."""

  def __init__(self, message: str, *, step: int, status: int):
    super().__init__(status)
    self.message, self.step, self.status = message, step, status

  def __str__(self):
    return self.message
