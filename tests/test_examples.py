"""examples/ run as the test suite's own code: the data-parallel training loop with a
user-defined loss (examples/train_glyphs.py) on the 8 fake devices, a few steps."""

import importlib.util
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod  # flax modules are dataclasses: their module must be importable
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.slow
def test_train_glyphs_example_learns_on_eight_devices():
  """40 steps (memory from step 8): the loop runs, fills its memory, and the
  embedding retrieves unseen characters better than at initialisation."""
  out = _load("train_glyphs").main(steps=40, memory_size=1024)
  assert np.all(np.isfinite(out["losses"]))
  assert out["memory_fill"] == 1.0  # 32 enqueues of 64 rows into 1,024 slots
  assert out["recall_after"] > out["recall_before"] + 0.05
