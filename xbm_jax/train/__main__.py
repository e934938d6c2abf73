r"""Train XBM: `python -m xbm_jax.train --config=glyphs --workdir=/tmp/xbm_glyphs`.

`--config` takes a config file (`configs/sop.py:smoke`) or the name of a stock config
shipped with the package (`sop`, `glyphs:smoke`, see `xbm_jax/configs/`).
Overrides: `--config.xbm.size=20000 --config.xbm.enabled=False ...`.
Multi-host: set XBM_COORDINATOR (host:port), XBM_NUM_PROCESSES and XBM_PROCESS_ID
(or pass the flags) on every host. The run resumes automatically from the last
checkpoint in --workdir. A mistake the user can fix (config, data, resume mismatch,
busy workdir) prints one line and exits with status 2; `--verbose` shows the
traceback and the libraries' INFO logs.
"""

import logging
import os
import sys

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

import xbm_jax

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(xbm_jax.__file__)), "configs")
USER_ERROR_STATUS = 2

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config: a .py file or a stock config name.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
_COORD = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
_PID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")
_VERBOSE = flags.DEFINE_bool(
  "verbose", False, "Tracebacks for user errors, and INFO logs of orbax/absl/jax."
)


def stock_config_path(value: str) -> str:
  """`glyphs:smoke` -> `<package>/configs/glyphs.py:smoke` when `glyphs` names a
  stock config and no such file exists here; anything else is returned as is."""
  path, sep, arg = value.partition(":")
  if os.path.exists(path) or "/" in path or path.endswith(".py"):
    return value
  stock = os.path.join(CONFIGS_DIR, path + ".py")
  return stock + sep + arg if os.path.exists(stock) else value


def resolve_argv(argv: list) -> list:
  out = []
  for a in argv:
    if a.startswith("--config="):
      a = "--config=" + stock_config_path(a[len("--config=") :])
    out.append(a)
  return out


def quiet_logs(verbose: bool) -> None:
  """Warnings only from the libraries (orbax logs each save at INFO: hundreds of
  long lines that bury the progress bar); ours as `warning: ...` lines."""
  if not verbose:
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("orbax", "jax", "absl"):
      logging.getLogger(name).setLevel(logging.WARNING)
  ours = logging.getLogger("xbm_jax")
  if not ours.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO if verbose else logging.WARNING)
    ours.propagate = False


def main(argv):
  del argv
  from xbm_jax import parallel  # pylint: disable=g-import-not-at-top
  from xbm_jax.train.errors import UserError  # pylint: disable=g-import-not-at-top

  quiet_logs(_VERBOSE.value)
  parallel.initialize_distributed(
    coordinator_address=_COORD.value, num_processes=_NPROC.value, process_id=_PID.value
  )
  from xbm_jax.train.loop import train_and_evaluate  # after distributed init

  try:
    metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    if _VERBOSE.value:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(USER_ERROR_STATUS)
  for k in sorted(metrics):
    if k.startswith("eval/") and "/num_" not in k:
      print(f"{k} = {metrics[k]:.4f}")


def run() -> None:
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, argv=resolve_argv(sys.argv))


if __name__ == "__main__":
  run()
