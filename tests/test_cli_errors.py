"""What a user's mistake looks like on the command line: one line, `error: ...`, the
last one printed, and exit status 2 (`--verbose` keeps the traceback).

Every case fails before training starts (no step is compiled): each of the ten
subprocesses costs the imports, 2-5 s.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import fakes
from xbm_jax.train import cli_checks
from xbm_jax.train.errors import ConfigError, ConfigKeyError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
PREPARE = os.path.join(ROOT, "scripts", "prepare_data.py")


def run(args, cwd=ROOT):
  return subprocess.run(
    args,
    cwd=cwd,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=300,
    check=False,
  )


def one_line_error(out) -> str:
  """The run's only stderr line (its exit status 2), without the `error: ` prefix."""
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
  return lines[0][len("error: ") :]


TYPO = "unknown config key config.optim.lrr (--config.optim.lrr); did you mean config.optim.lr?"


@pytest.mark.slow
def test_a_mistyped_config_key_names_the_key_and_the_likely_one(tmp_path):
  wd = str(tmp_path / "run")
  args = ["--config=glyphs:smoke", f"--workdir={wd}", "--config.optim.lrr=1e-3"]
  assert one_line_error(run([sys.executable, "-m", "xbm_jax.train", *args], cwd=tmp_path)) == TYPO
  assert one_line_error(run([sys.executable, TRAIN, *args])) == TYPO
  out = run([sys.executable, TRAIN, *args, "--verbose"])
  assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigKeyError" in out.stderr
  assert not os.path.exists(wd)  # nothing written


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("xbm-train"), reason="xbm-train is not installed")
def test_the_installed_command_says_the_same(tmp_path):
  args = ["--config=glyphs:smoke", f"--workdir={tmp_path / 'run'}", "--config.optimm.lr=1"]
  assert one_line_error(run(["xbm-train", *args], cwd=tmp_path)) == (
    "unknown config key config.optimm (--config.optimm.lr); did you mean config.optim?"
  )


@pytest.mark.slow
def test_a_flag_absl_does_not_know_is_one_line_too(tmp_path):
  out = run([sys.executable, TRAIN, "--config=glyphs:smoke", f"--workdirr={tmp_path}"])
  assert one_line_error(out).startswith("Unknown command line flag 'workdirr'. Did you mean")


def test_config_checks_in_process(tmp_path):
  """The checks behind the lines above, without a subprocess each."""
  configs = os.path.join(ROOT, "configs")
  with pytest.raises(ConfigError, match="^cannot load --config=nope: no file 'nope' and no"):
    cli_checks.check_config_overrides(["x", "--config=nope"], configs)
  glyphs = os.path.join(configs, "glyphs.py:smoke")
  for flag, message in [
    ("--config.optim.lr.x=1", "--config.optim.lr.x: config.optim.lr is a value, not a section"),
    ("--config.xbm.sise=8", "unknown config key config.xbm.sise (--config.xbm.sise); did you mean"),
    ("--noconfig.xbm.enabledd", "did you mean config.xbm.enabled?"),
    (
      "--config.zzz=1",
      "unknown config key config.zzz (--config.zzz); config has drift, evals, input,",
    ),
  ]:
    with pytest.raises(ConfigKeyError, match=re.escape(message)):
      cli_checks.check_config_overrides(["x", f"--config={glyphs}", flag], configs)
  cli_checks.check_config_overrides(["x", f"--config={glyphs}", "--config.xbm.size=8"], configs)
  cli_checks.check_workdir(str(tmp_path / "new" / "run"))
  assert os.listdir(tmp_path) == []  # the check leaves nothing behind


@pytest.mark.slow
def test_a_workdir_that_cannot_be_written(tmp_path):
  """Tests run as root, which ignores permission bits: a regular file where a folder
  should be, and (where chattr works) an immutable folder."""
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  out = run([sys.executable, TRAIN, "--config=glyphs:smoke", f"--workdir={blocker}/run"])
  assert one_line_error(out) == (
    f"--workdir {blocker}/run cannot be created: {blocker} is a file, not a folder"
  )
  frozen = tmp_path / "frozen"
  frozen.mkdir()
  if shutil.which("chattr") is None or run(["chattr", "+i", str(frozen)]).returncode != 0:
    pytest.skip("chattr +i is not available here")
  try:
    out = run([sys.executable, TRAIN, "--config=glyphs:smoke", f"--workdir={frozen}/run"])
    assert one_line_error(out) == (
      f"cannot write to --workdir {frozen}/run: Operation not permitted ({frozen}/run)"
    )
  finally:
    run(["chattr", "-i", str(frozen)])
  assert os.listdir(frozen) == []


@pytest.mark.slow
def test_help_lists_the_flags_that_matter():
  out = run([sys.executable, TRAIN, "--help"])
  assert out.returncode == 0
  for flag in ("--config:", "--workdir:", "--verbose:", "--helpfull"):
    assert flag in out.stdout, out.stdout
  assert "Try --helpfull" not in out.stdout + out.stderr


def prepare(manual, data, *extra):
  args = ["--dataset", "listfile", "--name", "mine", "--manual_dir", manual, "--data_dir", data]
  return run([sys.executable, PREPARE, *args, *extra])


@pytest.mark.slow
def test_prepare_data_names_a_corrupt_or_missing_image_and_the_flag_that_skips_it(tmp_path):
  manual, data = str(tmp_path / "m"), str(tmp_path / "d")
  fakes.listfile(manual, {"train": {1: 2, 2: 2}, "test": {3: 2}})
  with open(os.path.join(manual, "imgs", "train_2_0.png"), "wb") as f:
    f.write(b"not an image")
  os.remove(os.path.join(manual, "imgs", "test_3_1.png"))
  out = prepare(manual, data)
  assert out.returncode == 2
  last = out.stderr.strip().splitlines()[-1]  # after the progress bar's own line
  missing = os.path.join(manual, "imgs", "test_3_1.png")
  assert last == (
    f"error: {missing}: cannot read image file (No such file or directory); "
    "pass --on_corrupt skip to leave such images out"
  )
  assert not os.path.exists(os.path.join(data, "mine", "1.0.0"))
  out = prepare(manual, data, "--on_corrupt", "skip")
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines()[-1] == (
    f"prepared {data}/mine/1.0.0: {{'test': 1, 'train': 3}}; skipped {{'test': 1, 'train': 1}}"
  )
  warnings = [line for line in out.stderr.splitlines() if "WARNING" in line]
  assert len(warnings) == 2 and "train_2_0.png: corrupt image" in " ".join(warnings)
  # tfds's INFO lines and its scratch-folder messages stay quiet without --verbose.
  for noise in (".tmp-", "Downloading and preparing", "dataset_builder.py"):
    assert noise not in out.stdout + out.stderr
