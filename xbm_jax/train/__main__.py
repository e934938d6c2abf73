r"""Train XBM: `python -m xbm_jax.train --config=glyphs --workdir=/tmp/xbm_glyphs`.

`--config` takes a config file (`configs/sop.py:smoke`) or the name of a stock config
shipped with the package (`sop`, `glyphs:smoke`, see `xbm_jax/configs/`).
Overrides: `--config.xbm.size=20000 --config.xbm.enabled=False ...`.
Multi-host: set XBM_COORDINATOR (host:port), XBM_NUM_PROCESSES and XBM_PROCESS_ID
(or pass the flags) on every host. The run resumes automatically from the last
checkpoint in --workdir. A mistake the user can fix (a flag, a config key or value,
missing data, an unwritable or busy workdir, a resume with another config) prints
one line and exits with status 2; `--verbose` shows the traceback and the libraries'
INFO logs.
"""

import logging
import os
import sys
import textwrap

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

import xbm_jax
from xbm_jax.train import cli_checks
from xbm_jax.train.errors import UserError

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(xbm_jax.__file__)), "configs")
USER_ERROR_STATUS = 2
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort")
USAGE = """\
usage: xbm-train --config=CONFIG --workdir=DIR [--config.SECTION.KEY=VALUE ...]
   or: python -m xbm_jax.train ...   or: python scripts/train.py ...

Trains (or resumes) a run in DIR: checkpoints/, metrics.jsonl, TensorBoard events,
pictures/, config.json. Examples:
  xbm-train --config=glyphs --workdir=/tmp/xbm_glyphs        # CPU demo, ~5-10 min
  xbm-train --config=glyphs --workdir=/tmp/glyphs_base --config.xbm.enabled=False
  xbm-train --config=configs/sop.py --workdir=/tmp/sop --config.input.data_dir=~/tfds
"""

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config: a .py file with get_config(arg) (`configs/sop.py`, `my.py:smoke`) "
  f"or a stock config name ({', '.join(cli_checks.stock_names(CONFIGS_DIR))}, "
  "e.g. `glyphs:smoke`). Any key: --config.SECTION.KEY=VALUE.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Where checkpoints and logs go; an existing run there is resumed."
)
_VERBOSE = flags.DEFINE_bool(
  "verbose", False, "Tracebacks for user errors, and INFO logs of orbax/absl/jax/tfds."
)
_COORD = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
_PID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")
OUR_FLAGS = ("config", "workdir", "verbose", "coordinator_address", "num_processes", "process_id")


def stock_config_path(value: str) -> str:
  """`glyphs:smoke` -> `<package>/configs/glyphs.py:smoke` when `glyphs` names a
  stock config and no such file exists here; anything else is returned as is."""
  path, sep, arg = value.partition(":")
  if os.path.exists(path) or "/" in path or path.endswith(".py"):
    return value
  stock = os.path.join(CONFIGS_DIR, path + ".py")
  return stock + sep + arg if os.path.exists(stock) else value


def resolve_argv(argv: list) -> list:
  """Stock config names in `--config=NAME` and `--config NAME` made paths."""
  out = []
  for a in argv:
    if a.startswith("--config="):
      a = "--config=" + stock_config_path(a[len("--config=") :])
    elif out and out[-1] == "--config":
      a = stock_config_path(a)
    out.append(a)
  return out


def wants_verbose(argv: list) -> bool:
  """`--verbose` as absl reads it, before absl has parsed anything."""
  on = False
  for a in argv[1:]:
    if a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1"):
      on = True
    elif a in ("--noverbose", "--verbose=false", "--verbose=False", "--verbose=0"):
      on = False
  return on


def fail(message: str, *, verbose: bool, exc: BaseException | None = None):
  """One line on stderr and status 2; with --verbose the exception itself."""
  if verbose and exc is not None:
    raise exc
  sys.stderr.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_STATUS)


def help_text(argv: list) -> str:
  lines = [USAGE, "flags:"]
  for name in OUR_FLAGS:
    f = flags.FLAGS[name]
    default = "" if f.default is None else f" (default: {f.default})"
    lines.append(
      textwrap.fill(
        f"--{name}: {f.help}{default}", 88, initial_indent="  ", subsequent_indent="      "
      )
    )
  lines.append(
    "  --helpfull: every flag, the libraries' included.\n\n"
    "Every config key and its default: xbm_jax/train/config.py; `--help` after\n"
    "--config=CONFIG prints that config's keys and values."
  )
  config_arg = cli_checks.config_argument(argv)
  if config_arg is not None:
    try:
      config = cli_checks.load_config(config_arg, CONFIGS_DIR)
    except UserError as e:
      lines.append(f"\n(cannot show --config={config_arg}: {e})")
    else:
      lines.append(f"\n--config={config_arg}, every key and its value:")
      lines += [f"  --config.{k}={v!r}" for k, v in cli_checks.flat_items(config)]
  return "\n".join(lines)


def parse_flags(argv: list) -> list:
  """absl's flag parsing, with each mistake as one line and status 2; `--help`
  shows the flags that matter (absl's own lists those of the script's module)."""
  verbose = wants_verbose(argv)
  if any(a in HELP_FLAGS or a.startswith("--help=") for a in argv[1:]):
    print(help_text(argv))
    sys.exit(0)
  try:
    cli_checks.check_config_overrides(argv, CONFIGS_DIR)
  except UserError as e:
    fail(str(e), verbose=verbose, exc=e)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e} (`--help` lists the flags)", verbose=verbose, exc=e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # config_flags' own
    fail(f"bad config override: {cli_checks.unquote(e)}", verbose=verbose, exc=e)


def quiet_logs(verbose: bool) -> None:
  """Warnings only from the libraries (orbax logs each save at INFO: hundreds of
  long lines that bury the progress bar); ours as `warning: ...` lines above the bar."""
  if not verbose:
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("orbax", "jax", "absl", "tensorflow_datasets"):
      logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(cli_checks.DropNoise())
  ours = logging.getLogger("xbm_jax")
  if not ours.handlers:
    handler = cli_checks.AboveTheBarHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO if verbose else logging.WARNING)
    ours.propagate = False


def main(argv):
  del argv
  from xbm_jax import parallel  # pylint: disable=g-import-not-at-top

  verbose = _VERBOSE.value
  quiet_logs(verbose)
  try:
    cli_checks.check_workdir(_WORKDIR.value)
  except UserError as e:
    fail(str(e), verbose=verbose, exc=e)
  parallel.initialize_distributed(
    coordinator_address=_COORD.value, num_processes=_NPROC.value, process_id=_PID.value
  )
  from xbm_jax.train.loop import train_and_evaluate  # after distributed init

  try:
    metrics = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    fail(str(e), verbose=verbose, exc=e)
  for k in sorted(metrics):
    if k.startswith("eval/") and "/num_" not in k:
      print(f"{k} = {metrics[k]:.4f}")


def run() -> None:
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, argv=resolve_argv(sys.argv), flags_parser=parse_flags)


if __name__ == "__main__":
  run()
