"""The three commands in process: outputs against the library, mistakes as one line + 2."""

import os

import numpy as np
import pytest

from xbm_jax.inference import cli
from xbm_jax.inference.index import Index

pytestmark = pytest.mark.slow  # the shared 6-step training


def run(main, args, capsys):
  """(exit status, stdout, stderr lines) of one command."""
  try:
    main(args)
    status = 0
  except SystemExit as e:
    status = e.code
  out = capsys.readouterr()
  return status, out.out, [l for l in out.err.splitlines() if l and not l.startswith("embed:")]


def test_embed_search_calibrate_agree_with_the_library(tiny_run, tmp_path, capsys):
  wd, lst = tiny_run["workdir"], tiny_run["list_file"]
  gal = str(tmp_path / "g.npz")
  status, out, _ = run(
    cli.embed, ["--model", wd, "--list", lst, "--out", gal, "--no-progress"], capsys
  )
  assert status == 0 and "30 labelled embeddings of dim 8" in out
  index = Index.load(gal)
  assert index.paths[0] == "imgs/test_000.png" and index.labels[0] == 100
  split = str(tmp_path / "s.npz")
  assert run(cli.embed, ["--model", wd, "--split", "test", "--out", split], capsys)[0] == 0
  np.testing.assert_array_equal(Index.load(split).emb, index.emb)  # file = its record
  files = [p for p, _, _ in tiny_run["images"][:2]]
  status, out, _ = run(
    cli.search, ["--index", gal, "--model", wd, "--images", *files, "--k", "3"], capsys
  )
  rows = [l.split("\t") for l in out.splitlines()]
  assert status == 0 and rows[0] == ["query", "rank", "path", "id", "label", "score"]
  scores, nn = index.search(index.emb[:2], 3)
  assert [r[2] for r in rows[1:4]] == list(index.paths[nn[0]])
  assert rows[1][2] == "imgs/test_000.png" and float(rows[1][5]) == pytest.approx(1, abs=1e-5)
  assert [float(r[5]) for r in rows[4:7]] == pytest.approx(scores[1], abs=1e-6)
  status, out, _ = run(cli.search, ["--index", gal, "--query-index", split, "--k", "2"], capsys)
  assert status == 0 and len(out.splitlines()) == 1 + 30 * 2
  th = str(tmp_path / "t.json")
  status, out, _ = run(cli.calibrate, ["--index", gal, "--precision", "0.9", "--out", th], capsys)
  assert status == 0 and "wrote" in out and os.path.exists(th)
  status, out, _ = run(
    cli.search, ["--index", gal, "--query-index", split, "--k", "30", "--threshold", th], capsys
  )
  from xbm_jax.inference.threshold import Threshold

  cut = Threshold.load(th).value
  want = (index.search(index.emb, 30)[0] >= cut).sum()
  assert status == 0 and len(out.splitlines()) == 1 + want


def test_mistakes_print_one_line_exit_2_and_write_nothing(tiny_run, tmp_path, capsys):
  wd, lst = tiny_run["workdir"], tiny_run["list_file"]
  out = str(tmp_path / "o.npz")
  bad = tmp_path / "imgs"
  bad.mkdir()
  (bad / "a.jpg").write_bytes(b"\xff\xd8 not really")
  (tmp_path / "nock").mkdir()
  (tmp_path / "nock" / "config.json").write_text("{}")
  Index(4).add(np.eye(4, dtype=np.float32)).save(str(tmp_path / "four.npz"))
  (tmp_path / "empty.npz").write_bytes(b"")
  cases = [
    (cli.embed, ["--model", wd, "--images", str(bad), "--out", out], "unreadable image .*a.jpg"),
    (
      cli.embed,
      ["--model", str(tmp_path / "nock"), "--list", lst, "--out", out],
      "has no checkpoint",
    ),
    (
      cli.embed,
      ["--model", wd, "--list", str(tmp_path / "no.txt"), "--out", out],
      "missing list file",
    ),
    (
      cli.embed,
      ["--model", wd, "--list", lst, "--out", "/nonexistent/x.npz"],
      "no folder /nonexistent",
    ),
    (
      cli.search,
      ["--index", str(tmp_path / "four.npz"), "--model", wd, "--list", lst],
      "4-d embeddings; --model makes 8-d",
    ),
    (
      cli.search,
      ["--index", str(tmp_path / "empty.npz"), "--query-index", str(tmp_path / "four.npz")],
      "empty.npz is not a readable index",
    ),
    (
      cli.calibrate,
      ["--index", str(tmp_path / "four.npz"), "--recall", "0.5", "--out", out],
      "needs labels",
    ),
  ]
  for main, args, message in cases:
    status, _, err = run(main, args, capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith("error: "), (args, err)
    assert __import__("re").search(message, err[0]), (message, err)
  assert not os.path.exists(out)
