"""docs/search.md's commands run as written on a tiny list-file dataset (one 6-step
training and six more subprocesses, ~1-2 min on CPU)."""

import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import fakes
from tests.helpers.docs import section_block, section_commands
from xbm_jax.inference.index import Index
from xbm_jax.inference.threshold import Threshold

# A tiny training run (the session's tiny_run fixture) or subprocesses: the slow tier.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


PAGE = "docs/search.md"


def doc_commands() -> list[str]:
  return section_commands(PAGE, "Train, embed, search, threshold")


@pytest.mark.slow
def test_the_search_walkthrough_runs_as_written(tmp_path):
  manual, queries = tmp_path / "mydata", tmp_path / "queries"
  fakes.listfile(str(manual), {"train": {c: 5 for c in range(8)}, "test": {20: 4, 21: 4, 22: 4}})
  queries.mkdir()
  for name in ("test_20_0.png", "test_21_1.png"):
    shutil.copy(manual / "imgs" / name, queries / name)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  outs = []
  commands = doc_commands()
  assert [c.split()[1] for c in commands] == [
    "scripts/prepare_data.py", "scripts/train.py", "scripts/embed.py", "scripts/search.py",
    "scripts/calibrate.py", "scripts/search.py", "scripts/export_embedder.py",
  ]  # fmt: skip
  for command in commands:
    command = command.replace("/tmp/", f"{tmp_path}/")  # first: tmp_path is under /tmp
    command = command.replace("~/mydata", str(manual)).replace("~/tfds", str(tmp_path / "tfds"))
    command = command.replace("~/queries", str(queries))
    args = [sys.executable if a == "python" else a for a in shlex.split(command)]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (command, out.stderr[-3000:])
    outs.append(out.stdout)
  gallery = Index.load(str(tmp_path / "gallery.npz"))
  assert len(gallery) == 12 and gallery.labelled and gallery.dim == 32  # the smoke CNN's dim
  rows = [l.split("\t") for l in outs[3].splitlines()]
  assert rows[0] == ["query", "rank", "path", "id", "label", "score"] and len(rows) == 1 + 2 * 3
  # Each query is a copy of a gallery image: its first neighbour is that image, score 1.
  assert rows[1][:3] == ["test_20_0.png", "1", "imgs/test_20_0.png"] and rows[1][4] == "20"
  assert rows[4][:3] == ["test_21_1.png", "1", "imgs/test_21_1.png"]
  assert float(rows[1][5]) == pytest.approx(1.0, abs=1e-5)
  t = Threshold.load(str(tmp_path / "threshold.json"))
  assert t.target == "recall" and t.recall >= 0.8 and t.num_positive_pairs == 3 * 6
  kept = [l.split("\t") for l in outs[5].splitlines()[1:]]
  assert kept and all(float(r[5]) >= t.value for r in kept)
  # The same neighbours the library finds, cut at the threshold.
  q = np.stack(
    [
      gallery.emb[list(gallery.paths).index(f"imgs/{n}")]
      for n in ("test_20_0.png", "test_21_1.png")
    ]
  )
  scores, _ = gallery.search(q, 10)
  assert len(kept) == int((scores >= t.value).sum())
  assert os.path.getsize(tmp_path / "embedder.jaxexp") > 0 and "wrote" in outs[6]

  # The "In Python" snippet, as written, on the same run.
  code = (
    section_block(PAGE, "In Python", "python")
    .replace("/tmp/", f"{tmp_path}/")
    .replace("~/mydata", str(manual))
  )
  photos = [np.asarray(Image.open(manual / "imgs" / f"test_2{i}_0.png")) for i in range(3)]
  names = dict(photos=np.stack(photos), photo_a=photos[0], photo_b=photos[1])
  exec(compile(code, "docs/search.md", "exec"), names)  # pylint: disable=exec-used
  assert names["rows"][:, 0].tolist() == [0, 4, 8]  # each photo finds its own file first
  assert names["index"].labels[names["rows"][0, 0]] == 20
