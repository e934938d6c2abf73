"""The drift-options benchmark runs on tiny sizes, and its own check holds: the
re-projection step equals the stale step whose memory holds the projected rows."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import drift_options  # noqa: E402  pylint: disable=g-import-not-at-top
import pytest


@pytest.mark.slow
def test_tiny_run_prints_a_row_per_size(capsys):
  drift_options.main(
    ["--sizes", "32,48", "--batch", "4", "--dim", "8", "--feature-dim", "16"]
    + ["--chunk-rows", "20", "--iters", "1"]
  )
  rows = capsys.readouterr().out.splitlines()
  assert [r.split()[0] for r in rows[2:]] == ["32", "48"]
  assert all(r.split()[3].endswith("x") for r in rows[2:])
