"""scripts/prepare_data.py end to end, as a user runs it."""

import os
import subprocess
import sys

import numpy as np

from tests.helpers import fakes
from xbm_jax.data import sources
import pytest

_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "scripts", "prepare_data.py")


def _run(*args):
  return subprocess.run(
    [sys.executable, _SCRIPT, *args], capture_output=True, text=True, timeout=120, check=False
  )


@pytest.mark.slow
def test_prepare_script_cub_then_malformed_list(tmp_path):
  manual, data = str(tmp_path / "m"), str(tmp_path / "d")
  fakes.cub(manual)
  out = _run("--dataset", "cub", "--manual_dir", manual, "--data_dir", data)
  assert out.returncode == 0, out.stderr
  assert "prepared" in out.stdout and "'train': 6" in out.stdout
  assert "cub/train" in out.stderr  # the tqdm bar
  np.testing.assert_array_equal(
    sources.load("cub", "test", data).labels, [101, 101, 150, 150, 200, 200]
  )
  images_txt = os.path.join(manual, "CUB_200_2011", "images.txt")
  with open(images_txt, "a") as f:
    f.write("13\n")
  out = _run("--dataset", "cub", "--manual_dir", manual, "--data_dir", str(tmp_path / "d2"))
  assert out.returncode != 0
  assert "images.txt:13: expected 2 fields" in out.stderr


@pytest.mark.slow
def test_prepare_script_reads_the_named_splits_and_errors_in_one_line(tmp_path):
  lists = tmp_path / "lists"
  fakes.image(str(lists / "imgs" / "x.png"), seed=0, fmt="PNG")
  for split in ("train", "test"):
    fakes.write(str(lists / f"{split}.txt"), "imgs/x.png,1\nimgs/x.png,2\n")
  fakes.write(str(lists / "README.txt"), "my data set\n")
  out = _run(
    "--dataset",
    "listfile",
    "--name",
    "mine",
    "--manual_dir",
    str(lists),
    "--data_dir",
    str(tmp_path / "d"),
  )
  assert out.returncode == 0, out.stderr
  assert "reading test <- test.txt, train <- train.txt; ignoring README.txt" in out.stdout
  assert sorted(sources.splits("mine", str(tmp_path / "d"))) == ["test", "train"]
  out = _run(
    "--dataset",
    "listfile",
    "--name",
    "mine2",
    "--manual_dir",
    str(lists),
    "--data_dir",
    str(tmp_path / "d"),
    "--splits",
    "train,valid",
  )
  assert out.returncode != 0
  assert out.stderr.strip().splitlines() == [
    f"error: {lists}: no list file for split(s) ['valid'] "
    "(expected valid.txt); found: ['README.txt', 'test.txt', 'train.txt']"
  ]
