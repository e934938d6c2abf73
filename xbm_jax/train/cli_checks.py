"""What the command line checks before training: the config file, every
`--config.KEY=VALUE` override's key, and that the workdir can be written.

Each check raises a `UserError` of one line (the trainer prints it and exits
with status 2), before anything is written or compiled.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Mapping

import tqdm

from xbm_jax.train.errors import ConfigError, ConfigKeyError, UserError, WorkdirError


def stock_names(configs_dir: str) -> list[str]:
  """The stock configs shipped with the package (`glyphs`, `sop`, ...)."""
  if not os.path.isdir(configs_dir):
    return []
  return sorted(n[:-3] for n in os.listdir(configs_dir) if n.endswith(".py") and n[0] != "_")


def config_argument(argv: list) -> str | None:
  """The value of `--config` in argv (`--config=X` or `--config X`), else None."""
  for i, a in enumerate(argv[1:], start=1):
    if a.startswith("--config="):
      return a[len("--config=") :]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load_config(value: str, configs_dir: str):
  """`path[:arg]` -> the ConfigDict its `get_config(arg)` returns.

  Raises:
    ConfigError: no such file (naming the stock configs), or the file fails to load.
  """
  path, _, arg = value.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(
      f"cannot load --config={value}: no file {path!r} and no stock config of that name "
      f"(stock: {', '.join(stock_names(configs_dir))})"
    )
  name = f"_xbm_user_config_{uuid.uuid4().hex}"
  try:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except UserError:
    raise
  except Exception as e:  # a broken config file: its own error, on one line
    raise ConfigError(f"cannot load --config={value}: {type(e).__name__}: {unquote(e)}") from e
  finally:
    sys.modules.pop(name, None)


def _override_paths(argv: list) -> list[tuple[str, str]]:
  """`(flag as given, dotted key)` of each `--config.a.b=v` / `--noconfig.a.b`."""
  out = []
  for a in argv[1:]:
    flag = a.split("=", 1)[0]
    for prefix in ("--config.", "--noconfig."):
      if flag.startswith(prefix) and "[" not in flag:
        out.append((flag, flag[len(prefix) :]))
  return out


def check_key(config, dotted: str, flag: str) -> None:
  """Raises ConfigKeyError unless `dotted` names a key of `config`, suggesting the
  closest key at the level where the path goes wrong."""
  node, seen = config, []
  for part in dotted.split("."):
    here = "config" + "".join("." + s for s in seen)
    if not isinstance(node, Mapping) and not hasattr(node, "keys"):
      raise ConfigKeyError(f"{flag}: {here} is a value, not a section")
    keys = [str(k) for k in node.keys()]
    if part not in keys:
      close = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
      hint = (
        f"; did you mean {here}.{close[0]}?" if close else f"; {here} has {', '.join(sorted(keys))}"
      )
      raise ConfigKeyError(f"unknown config key {here}.{part} ({flag}){hint}")
    node, seen = node[part], seen + [part]


def flat_items(config, prefix: str = "") -> list[tuple[str, object]]:
  """`[("optim.lr", 0.001), ...]`: every leaf of a config, dotted, in key order."""
  out = []
  for key in sorted(config.keys()):
    value = config[key]
    if isinstance(value, Mapping) or hasattr(value, "keys"):
      out += flat_items(value, f"{prefix}{key}.")
    else:
      out.append((f"{prefix}{key}", value))
  return out


def check_config_overrides(argv: list, configs_dir: str) -> None:
  """Loads `--config` and checks every override's key against it.

  config_flags would stop at a mistyped key with a ~50-line traceback; a missing
  config file would only fail when the trainer first reads the config.
  """
  value = config_argument(argv)
  if value is None:
    return  # absl says that --config is required
  config = load_config(value, configs_dir)
  for flag, dotted in _override_paths(argv):
    check_key(config, dotted, flag)


def unquote(e: BaseException) -> str:
  """An exception's message on one line (KeyError and config_dict quote theirs)."""
  text = str(e.args[0]) if e.args else str(e)
  while len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1]
  return " ".join(text.replace("\\n", "\n").replace("\\'", "'").split())


def _first_existing(path: str) -> str:
  while path and not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def check_workdir(workdir: str | None) -> None:
  """Checks that `workdir` can be created and a file written in it, leaving the
  disk as it was (folders made for the check are removed again).

  Raises:
    WorkdirError: naming the folder and the reason (a file in the way, a folder
      that cannot be created or written).
  """
  if not workdir:
    return  # absl says that --workdir is required
  path = os.path.abspath(os.path.expandvars(os.path.expanduser(workdir)))
  existing = _first_existing(path)
  if existing and not os.path.isdir(existing):
    what = "is" if existing == path else f"cannot be created: {existing} is"
    raise WorkdirError(f"--workdir {workdir} {what} a file, not a folder")
  made = []
  try:
    for folder in _folders_below(existing, path):
      os.mkdir(folder)
      made.append(folder)
    fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    reason = e.strerror or type(e).__name__
    raise WorkdirError(
      f"cannot write to --workdir {workdir}: {reason} ({e.filename or path})"
    ) from e
  finally:
    for folder in reversed(made):
      os.rmdir(folder)


def _folders_below(existing: str, path: str) -> list[str]:
  """The folders from just below `existing` down to `path`, top first."""
  out = []
  while path != existing:
    out.append(path)
    path = os.path.dirname(path)
  return out[::-1]


class AboveTheBarHandler(logging.Handler):
  """Log records on stderr as whole lines above the progress bar (tqdm.write), so a
  warning is never glued to the bar's line."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      tqdm.tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # logging must never raise
      self.handleError(record)


class DropNoise(logging.Filter):
  """Drops library warnings that ask nothing of the user (tfds: "OpenCV is not
  installed ... Defaulting to PIL", at every run that decodes images)."""

  NOISE = ("OpenCV is not installed",)

  def filter(self, record: logging.LogRecord) -> bool:
    return not any(n in record.getMessage() for n in self.NOISE)
