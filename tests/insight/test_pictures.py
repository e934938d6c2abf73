"""retrieval_grid layout on a hand-made retrieval; query choice; PNG round trip."""

import numpy as np
import pytest
from PIL import Image

from xbm_jax.insight import pictures
from xbm_jax.insight.pictures import (
  GRAY,
  GREEN,
  RED,
  WHITE,
  choose_queries,
  retrieval_grid,
  retrieve,
  save_png,
)


def test_grid_layout_and_borders():
  h, w, b, p = 4, 5, 2, 1
  queries = np.stack([np.full((h, w), 10 + i, np.uint8) for i in range(2)])  # gray
  gallery = np.stack([np.full((h, w, 3), 100 + i, np.uint8) for i in range(6)])
  topk = np.array([[3, 0, -1], [5, 4, 1]])
  correct = np.array([[True, False, False], [False, True, True]])
  img = retrieval_grid(queries, gallery, topk, correct, border=b, pad=p, min_size=0, caption=None)
  ch, cw = h + 2 * b, w + 2 * b
  assert img.dtype == np.uint8
  assert img.shape == (2 * ch + 3 * p, 4 * cw + 5 * p, 3) == (19, 41, 3)

  def cell(row, col):
    y, x = p + row * (ch + p), p + col * (cw + p)
    return img[y : y + ch, x : x + cw]

  for i in range(2):
    c = cell(i, 0)
    assert (c[0, 0] == GRAY).all() and (c[-1, -1] == GRAY).all()
    assert (c[b:-b, b:-b] == 10 + i).all()
    for j in range(3):
      c = cell(i, j + 1)
      if topk[i, j] < 0:
        assert (c == WHITE).all()
        continue
      colour = GREEN if correct[i, j] else RED
      frame = np.ones((ch, cw), bool)
      frame[b:-b, b:-b] = False
      assert (c[frame] == colour).all(), (i, j)
      assert (c[b:-b, b:-b] == 100 + topk[i, j]).all()
  assert (img[0] == WHITE).all() and (img[:, -1] == WHITE).all()  # outer padding


def test_small_images_are_enlarged_and_the_grid_has_a_caption():
  """32 px glyphs used to give an unreadable strip with no word on how to read it."""
  rng = np.random.default_rng(0)
  q = rng.integers(0, 256, (2, 32, 32), dtype=np.uint8)
  g = rng.integers(0, 256, (6, 32, 32), dtype=np.uint8)
  topk = np.array([[0, 1, 2, 3, 4], [5, 4, 3, 2, 1]])
  correct = np.zeros((2, 5), bool)
  plain = retrieval_grid(q, g, topk, correct, caption=None)
  cell = 64 + 2 * 2  # each glyph enlarged 2x to 64 px, 2 px border
  assert plain.shape == (2 * cell + 3 * 2, 6 * cell + 7 * 2, 3)
  y = x = 2 + 2  # pad + border: the first query, every pixel a 2 x 2 block
  assert (plain[y : y + 64, x : x + 64, 0] == np.repeat(np.repeat(q[0], 2, 0), 2, 1)).all()

  img = retrieval_grid(q, g, topk, correct)
  strip = img[: img.shape[0] - plain.shape[0]]
  assert img.shape[1] == plain.shape[1] and (img[len(strip) :] == plain).all()
  assert len(strip) >= 14  # at least one line of text
  ink = strip.max(axis=-1) < 100  # dark pixels on the white strip
  assert ink.sum() > 200 and ink.any(axis=0).sum() > plain.shape[1] // 2
  assert not (plain[:2] < 100).any()  # the oracle: no ink without caption
  big = rng.integers(0, 256, (1, 96, 96, 3), dtype=np.uint8)
  assert retrieval_grid(big, big, [[0]], [[True]], caption=None).shape == (
    96 + 4 + 4,
    2 * (96 + 4) + 6,
    3,
  )  # already large: not enlarged


def test_a_title_names_the_run_and_the_step_above_the_caption():
  q = np.full((1, 32, 32), 50, np.uint8)
  title = pictures.run_title("/runs/xbm_glyphs/", "glyphs", 1200)
  assert title == "xbm_glyphs: glyphs at step 1,200"
  captioned = retrieval_grid(q, q, [[0]], [[True]])
  titled = retrieval_grid(q, q, [[0]], [[True]], title=title)
  strip = titled[: titled.shape[0] - captioned.shape[0]]
  assert (titled[len(strip) :] == captioned).all() and len(strip) >= 14
  assert (strip.max(axis=-1) < 100).sum() > 100  # the title's ink, above the caption


def test_captioned_picture_saves_at_its_size(tmp_path):
  g = np.full((3, 32, 32), 200, np.uint8)
  img = retrieval_grid(g[:1], g, [[1, 2]], [[True, False]])
  save_png(str(tmp_path / "r.png"), img)
  with Image.open(tmp_path / "r.png") as im:
    assert im.size == (img.shape[1], img.shape[0]) and im.size[1] >= 64 + 14


def test_grid_errors():
  q = np.zeros((1, 4, 4), np.uint8)
  with pytest.raises(ValueError, match="H, W must match"):
    retrieval_grid(q, np.zeros((2, 5, 4), np.uint8), [[0]], [[True]])
  with pytest.raises(ValueError, match="topk indices"):
    retrieval_grid(q, np.zeros((2, 4, 4), np.uint8), [[2]], [[True]])
  with pytest.raises(ValueError, match="uint8"):
    retrieval_grid(q.astype(np.float32), q, [[0]], [[True]])


def test_choose_queries_is_fixed_by_seed():
  a = choose_queries(10, 1000, seed=3)
  assert (a == choose_queries(10, 1000, seed=3)).all()
  assert not (a == choose_queries(10, 1000, seed=4)).all()
  assert len(set(a.tolist())) == 10 and (np.diff(a) > 0).all() and a.max() < 1000
  assert choose_queries(10, 4, seed=0).tolist() == [0, 1, 2, 3]


def test_retrieve_leave_one_out():
  emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
  labels = np.array([0, 0, 1, 0])
  topk, correct = retrieve(emb, emb, labels, labels, k=2, self_index=np.arange(4))
  assert topk.tolist() == [[1, 3], [0, 3], [3, 1], [2, 1]]
  assert correct.tolist() == [[True, True], [True, True], [False, False], [False, True]]


def test_save_png_round_trip(tmp_path):
  img = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
  path = tmp_path / "sub" / "grid.png"
  save_png(str(path), img)
  assert (np.asarray(Image.open(path)) == img).all()
  assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]


def test_saved_pictures_have_the_mode_of_any_new_file(tmp_path):
  """mkstemp's 0600 used to leak into the pictures (unreadable to a group or web server)."""
  import os

  old = os.umask(0o022)
  try:
    path = str(tmp_path / "p.png")
    save_png(path, np.zeros((4, 4), np.uint8))
    with open(str(tmp_path / "plain"), "w"):
      pass  # the oracle: what open() gives a new file under this umask
    assert os.stat(path).st_mode & 0o777 == os.stat(str(tmp_path / "plain")).st_mode & 0o777
    assert os.stat(path).st_mode & 0o777 == 0o644
  finally:
    os.umask(old)
