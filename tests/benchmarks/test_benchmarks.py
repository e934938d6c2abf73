"""The GPU suite's smoke mode runs end to end on CPU (tiny sizes), and its glyph check
tells matching first losses from different ones."""

import os
import sys

import pytest

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks")
)
import gpu_suite  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.mark.slow
def test_smoke_sections_run_and_fill_the_table(capsys):
  rows = gpu_suite.main(["--smoke", "--sections", "env,train_step,loss_mem,retrieval"])
  names = [r[0] for r in rows]
  assert not [r for r in rows if r[1] == "FAILED"], rows
  assert names[:2] == ["device", "versions"] and "jax " in rows[1][1]
  assert {"train step, memory", "train step, no memory", "memory overhead"} <= set(names)
  assert sum(n.startswith("loss+memory M=") for n in names) == 2
  assert sum(n.startswith("retrieval ") for n in names) == 2
  assert "memory overhead" in capsys.readouterr().out


@pytest.mark.parametrize("scale,want", [(1.0, "match"), (1.001, "match"), (1.1, "DIFFER")])
def test_glyph_check_compares_against_the_recorded_reference(monkeypatch, scale, want):
  import json  # pylint: disable=g-import-not-at-top

  with open(gpu_suite.REFERENCE) as f:
    ref = json.load(f)["losses"]
  assert len(ref) >= gpu_suite.SMOKE["glyph_steps"]
  got = [v * scale for v in ref]
  got[-1] = ref[-1]  # a single differing step is enough to fail
  got[0] = ref[0] * scale
  monkeypatch.setattr(gpu_suite, "glyph_losses", lambda steps: got[:steps])
  rows = []
  gpu_suite.glyphs(gpu_suite.SMOKE, rows)
  assert rows[0][1] == want, rows
