"""benchmarks/inference.py runs end to end at tiny sizes and its checks hold there."""

import re

import pytest

from benchmarks import inference as bench

# A tiny training run (the session's tiny_run fixture) or subprocesses: the slow tier.
pytestmark = pytest.mark.slow


@pytest.mark.slow  # ~15 s on 2 CPU cores
def test_the_benchmark_runs_and_its_figures_parse():
  lines = bench.main(
    ["--gallery", "3000", "--dim", "16", "--queries", "50", "--images", "24", "--batch", "8",
     "--model", "small_cnn", "--crop", "16", "--repeats", "1"]
  )  # fmt: skip
  text = "\n".join(lines)
  assert re.search(r"embedder [\d.]+ img/s -> [\d.]+x", text)
  assert re.search(r"exact [\d.]+ s", text)
  peak = float(re.search(r"= ([\d.]+)x the embeddings", text).group(1))
  assert 1.0 <= peak <= 1.5  # the index holds the embeddings once, streamed to disk
  faiss = re.search(r"differing: (\d+) of \d+, all at tied scores: (\w+)", text)
  assert faiss is None or faiss.group(2) == "True"
