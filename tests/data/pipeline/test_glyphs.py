"""Glyph builder on DejaVu fonts shipped with matplotlib; the committed embedded data."""

import os

import matplotlib
import numpy as np
import pytest

from xbm_jax.data import glyphs

TTF = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
MISSING = "\u65e5"  # a kanji DejaVu lacks: renders the .notdef box


def _face(name):
  return glyphs.find_faces(os.path.join(TTF, name))[0]


def test_jis_level1_kanji():
  chars = glyphs.jis_level1_kanji()
  assert len(chars) == 2965 and len(set(chars)) == 2965
  assert chars[0] == "\u4e9c" and chars[-1] == "\u8155"  # first and last of rows 16-47


def test_render_face_flags_placeholder_and_blank():
  face = _face("DejaVuSans.ttf")
  images, valid = glyphs.render_face(face, ["A", MISSING, " ", "g"], size=24)
  assert images.shape == (4, 24, 24) and images.dtype == np.uint8
  np.testing.assert_array_equal(valid, [True, False, False, True])
  assert images[0].max() == 255
  # Centred on the ink box: the ink spans the same margin on both sides (+-1 px).
  cols = np.flatnonzero(images[0].max(axis=0) > 0)
  assert abs(cols[0] - (23 - cols[-1])) <= 1


def test_build_tiny_glyph_set():
  faces = [
    _face(n)
    for n in (
      "DejaVuSans.ttf",
      "DejaVuSerif.ttf",
      "DejaVuSansMono.ttf",
      "DejaVuSans-Bold.ttf",
      "DejaVuSerif-Bold.ttf",
    )
  ]
  # A second copy of DejaVuSans (same outlines under another entry) must be dropped.
  faces.append(glyphs.Face(faces[0].path, 0, "DejaVuSans copy"))
  chars = list("ABCDEFGHIJKL") + [MISSING, " "]
  logs = []
  data = glyphs.build(
    faces,
    chars,
    size=16,
    min_faces=3,
    num_train_classes=8,
    dup_threshold=0.01,
    sample_chars=10,
    seed=0,
    log=logs.append,
  )
  assert len(data["face_names"]) == 5
  assert "DejaVuSans copy" not in set(data["face_names"])
  assert any("near-identical" in line for line in logs)
  assert MISSING not in set(data["chars"]) and " " not in set(data["chars"])
  assert sorted(data["chars"]) == list("ABCDEFGHIJKL")
  n = len(data["labels"])
  assert data["images"].shape == (n, 16, 16) and data["images"].dtype == np.uint8
  counts = np.bincount(data["labels"])
  assert (counts >= 3).all() and (counts <= 5).all()
  train = set(data["labels"][data["split"] == 0])
  test = set(data["labels"][data["split"] == 1])
  assert len(train) == 8 and len(test) == 4 and not train & test
  # No exact duplicate image inside a class.
  for c in range(len(data["chars"])):
    ims = data["images"][data["labels"] == c].reshape(counts[c], -1)
    assert len(np.unique(ims, axis=0)) == counts[c]


@pytest.mark.parametrize("bits,tol", [(8, 0), (4, 9)])
def test_encode_decode_roundtrip(bits, tol):
  x = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  y = glyphs.decode_images(glyphs.encode_images(x, bits), x.shape, bits)
  assert y.shape == x.shape and y.dtype == np.uint8
  assert np.abs(y.astype(int) - x).max() <= tol


@pytest.fixture(scope="module")
def embedded():
  return {s: glyphs.load_embedded(s) for s in ("train", "test")}


def test_embedded_data_loads_offline(embedded):
  train, test = embedded["train"], embedded["test"]
  assert train.num_classes + test.num_classes >= 1000
  assert train.num_classes >= 1000
  assert not set(np.unique(train.labels)) & set(np.unique(test.labels))
  rec = train[0]
  assert rec["image"].shape == (32, 32, 1) and rec["image"].dtype == np.uint8
  for src in (train, test):
    counts = np.bincount(src.labels)
    assert counts[counts > 0].min() >= 5  # every class has several typefaces
    assert src.images.reshape(len(src), -1).max(axis=1).min() > 0  # no blank glyph
  assert os.path.getsize(glyphs.DATA_FILE) <= 10 * 2**20
  assert os.path.isfile(os.path.join(os.path.dirname(glyphs.DATA_FILE), "FONTS.md"))
