"""The command line: stock configs by name, one clear line for a user's mistake."""

import os
import subprocess
import sys

from xbm_jax.train import __main__ as cli
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_stock_config_names_resolve_to_the_shipped_files():
  path, _, arg = cli.stock_config_path("glyphs:smoke").partition(":")
  assert arg == "smoke"
  assert os.path.samefile(path, os.path.join(ROOT, "configs", "glyphs.py"))
  assert cli.stock_config_path("configs/sop.py:smoke") == "configs/sop.py:smoke"
  assert cli.stock_config_path("nope") == "nope"  # config_flags then names it
  spaced = cli.resolve_argv(["train", "--config", "glyphs:smoke", "--workdir=w"])
  assert spaced[2] == cli.stock_config_path("glyphs:smoke") and spaced[3] == "--workdir=w"


def run_cli(args, cwd):
  return subprocess.run(
    [sys.executable, *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=120,
  )


@pytest.mark.slow
def test_a_bad_config_value_is_one_line_and_exit_status_2(tmp_path):
  """Used to be a bare `KeyError: 'float16'` traceback after 15 s of set-up."""
  wd = str(tmp_path / "run")
  out = run_cli(
    [
      "-m",
      "xbm_jax.train",
      "--config=glyphs:smoke",
      f"--workdir={wd}",
      "--config.xbm.dtype=float16",
    ],
    cwd=str(tmp_path),
  )
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
    "error: config.xbm.dtype='float16' is not valid; choose one of float32, bfloat16"
  ]
  # The wrapper script behaves the same; --verbose brings the traceback back.
  out = run_cli(
    [
      os.path.join(ROOT, "scripts", "train.py"),
      "--config=glyphs:smoke",
      f"--workdir={wd}",
      "--config.xbm.dtype=float16",
      "--verbose",
    ],
    cwd=ROOT,
  )
  assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr
