"""The SOP-shaped glyph testbed builder (xbm_jax/data/glyph_testbed.py, scripts/build_cjk.py).

CI has no CJK font, so the logic runs on the DejaVu / Last Resort fonts matplotlib ships
(a pinned dependency): cmap filtering, placeholder and twin faces, per-class typeface
choice, layout, splits, the tfds output. A few seconds in all.
"""

import json
import os
import shutil

import jax
import matplotlib
import numpy as np
import pytest

from scripts import build_cjk
from xbm_jax.data import glyph_testbed, glyphs, sources

TTF = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
FACES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
# Latin, Cyrillic, Greek, a Han ideograph and a Hangul syllable (no DejaVu face has
# these two), and box-drawing / math symbols some faces lack.
CHARS = list("AgЖλ€一한") + ["\u2a00", "\u2b1f", "\u27c2", "\u0e01"]


def _faces(names=FACES):
  return [f for n in names for f in glyphs.find_faces(os.path.join(TTF, n))]


def _draws(face, char):
  """Oracle independent of the cmap: FreeType draws the face's .notdef for a character
  it lacks, so the character is drawn iff its render differs from an unassigned one's."""
  font = face.font()
  im = glyphs.render(font, char)
  return im.max() >= 32 and not np.array_equal(im, glyphs.render(font, glyphs.UNASSIGNED))


def test_han_chars_are_the_two_blocks_minus_every_jis_x0208_kanji():
  chars = glyph_testbed.han_chars(exclude="丂")

  # Oracle: EUC-JP encodes a JIS X 0208 kanji (rows 16-84) as two bytes 0xB0-0xF4, 0xA1-0xFE.
  def is_jis_kanji(c):
    try:
      b = c.encode("euc_jp")
    except UnicodeEncodeError:
      return False
    return len(b) == 2 and 0xB0 <= b[0] <= 0xF4

  block = [chr(c) for c in [*range(0x4E00, 0xA000), *range(0x3400, 0x4DC0)]]
  assert chars == [c for c in block if not is_jis_kanji(c) and c != "丂"]
  assert "亜" not in chars and "弌" not in chars  # level 1 / level 2
  assert not set(chars) & set(glyphs.jis_level1_kanji())


def test_cmap_chars_are_what_the_face_draws():
  for face in _faces():
    has = glyph_testbed.cmap_chars(face)
    assert {c for c in CHARS if c in has} == {c for c in CHARS if _draws(face, c)}, face.name
  assert "A" in has and "一" not in has


def test_covering_faces_filters_on_coverage_and_name():
  faces = _faces()
  got = glyph_testbed.covering_faces(faces, CHARS, min_coverage=5, exclude="Mono")
  expect = [f for f in faces if "Mono" not in f.name and sum(_draws(f, c) for c in CHARS) >= 5]
  assert [f for f, _ in got] == expect
  assert all(has == {c for c in CHARS if _draws(f, c)} for f, has in got)


def test_one_face_per_design_family():
  assert glyph_testbed.family("Noto Serif CJK TC Bold") == "Noto Serif CJK"
  assert glyph_testbed.family("Noto Sans Mono CJK KR Black") == "Noto Sans CJK"
  assert glyph_testbed.family("AR PL UMing CN Light") == "AR PL UMing"
  assert glyph_testbed.family("WenQuanYi Zen Hei Sharp Regular") == "WenQuanYi Zen Hei Sharp"
  faces = _faces()  # DejaVu Sans Book, Sans Bold, Serif Book, Sans Mono Book
  n = len(CHARS)
  covered = [(f, frozenset(CHARS[: n - i])) for i, f in enumerate(faces)]
  got = glyph_testbed.one_per_family(covered)
  assert [f.name for f, _ in got] == ["DejaVu Sans Book", "DejaVu Serif Book"]
  # Among equal coverage a regular weight wins; more coverage wins over weight.
  bold_first = [(faces[1], frozenset(CHARS)), (faces[0], frozenset(CHARS))]
  assert [f.name for f, _ in glyph_testbed.one_per_family(bold_first)] == ["DejaVu Sans Book"]
  bold_more = [(faces[1], frozenset(CHARS)), (faces[0], frozenset(CHARS[:2]))]
  assert [f.name for f, _ in glyph_testbed.one_per_family(bold_more)] == ["DejaVu Sans Bold"]


def test_distinct_faces_drop_a_renamed_twin_and_a_placeholder_font(tmp_path):
  twin = tmp_path / "Twin.ttf"
  shutil.copy(os.path.join(TTF, "DejaVuSans.ttf"), twin)
  faces = _faces() + glyphs.find_faces(str(twin)) + _faces(("LastResortHE-Regular.ttf",))
  covered = glyph_testbed.covering_faces(faces, list("ABCDEFGHIJ"), min_coverage=1)
  assert len(covered) == 6  # Last Resort's cmap claims everything
  kept = glyph_testbed.distinct_faces(
    covered, dup_threshold=0.07, sample_chars=10, size=32, margin=2, seed=0
  )
  assert [f.path for f, _ in kept] == [os.path.join(TTF, n) for n in FACES]


def test_render_classes_take_distinct_faces_that_draw_the_character():
  covered = glyph_testbed.covering_faces(_faces(), CHARS, min_coverage=1)
  per_class = 3
  kept, images, face_ids = glyph_testbed.render_classes(
    covered, CHARS, per_class=per_class, seed=0, log=lambda _: None
  )
  drawn = {c: [i for i, (f, _) in enumerate(covered) if _draws(f, c)] for c in CHARS}
  assert kept == [c for c in CHARS if len(drawn[c]) >= per_class]
  assert "一" not in kept and "A" in kept and len(kept) < len(CHARS)
  assert images.shape == (len(kept) * per_class, 32, 32)
  for n, char in enumerate(kept):
    ids = face_ids[n * per_class : (n + 1) * per_class]
    assert len(set(ids)) == per_class and set(ids) <= set(drawn[char])
    for fi, im in zip(ids, images[n * per_class : (n + 1) * per_class]):
      np.testing.assert_array_equal(im, glyphs.render(covered[fi][0].font(), char))
      rows, cols = np.nonzero(im)  # centred on its ink box, longest side 32 - 2 x 2
      extent = (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1)
      assert max(extent) in (28, 29)
      assert abs((rows.max() + rows.min()) / 2 - 15.5) <= 1
      assert abs((cols.max() + cols.min()) / 2 - 15.5) <= 1
  again = glyph_testbed.render_classes(covered, CHARS, per_class=per_class, seed=0, log=print)
  np.testing.assert_array_equal(again[2], face_ids)  # seeded by (seed, code point)


def test_split_classes_counts_and_errors():
  split = glyph_testbed.split_classes(20, num_val=4, num_train=None, seed=1)
  assert np.bincount(split, minlength=3).tolist() == [8, 4, 8]
  np.testing.assert_array_equal(
    split, glyph_testbed.split_classes(20, num_val=4, num_train=None, seed=1)
  )
  assert np.bincount(glyph_testbed.split_classes(20, num_val=2, num_train=15, seed=0)).tolist() == [
    15,
    2,
    3,
  ]
  with pytest.raises(ValueError, match="num_val=20"):
    glyph_testbed.split_classes(20, num_val=20, num_train=None, seed=0)
  with pytest.raises(ValueError, match="num_train=16"):
    glyph_testbed.split_classes(20, num_val=4, num_train=16, seed=0)


def test_rgb_params_give_a_grey_rgb_image_the_grey_image_s_features():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(3, 3, 1, 4)).astype(np.float32)
  grey = rng.uniform(size=(2, 8, 8, 1)).astype(np.float32)
  variables = {"params": {"conv0": {"kernel": kernel}, "fc": {"kernel": np.ones((4, 2))}}}
  rgb = glyph_testbed.rgb_params(variables)
  assert rgb["params"]["conv0"]["kernel"].shape == (3, 3, 3, 4)
  np.testing.assert_array_equal(rgb["params"]["fc"]["kernel"], np.ones((4, 2)))
  conv = lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  np.testing.assert_allclose(
    conv(np.repeat(grey, 3, -1), rgb["params"]["conv0"]["kernel"]),
    conv(grey, kernel),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.fixture(scope="module")
def tiny_cjk(tmp_path_factory):
  """scripts/build_cjk.py on 14 Latin letters (and a Han one no DejaVu face has), 4
  DejaVu faces each: 6 train / 2 val / 6 test classes of 4 images."""
  data_dir = str(tmp_path_factory.mktemp("cjk"))
  fonts = [a for n in FACES for a in ("--font_dir", os.path.join(TTF, n))]
  args = ["--chars", "ABCDEFGHIJKLMN一", "--per_class", "4", "--num_val", "2", "--num_train", "0"]
  build_cjk.main([*fonts, *args, "--min_coverage", "1", "--all_weights", "--data_dir", data_dir])
  return data_dir


def test_build_script_writes_class_disjoint_tfds_splits(tiny_cjk):
  path = os.path.join(tiny_cjk, "cjk", "1.0.0")
  info = json.load(open(os.path.join(path, "testbed.json"), encoding="utf-8"))
  assert info["chars"] == "ABCDEFGHIJKLMN" and info["classes"] == {"train": 6, "val": 2, "test": 6}
  seen = set()
  for split in ("train", "val", "test"):
    src = sources.load("cjk", split, tiny_cjk)
    labels = src.labels
    assert np.bincount(labels).max() == 4 and len(labels) == 4 * info["classes"][split]
    assert not seen & set(labels.tolist())
    seen |= set(labels.tolist())
    ex = src[0]
    image = np.asarray(ex["image"])
    assert image.shape == (32, 32, 3) and (image == image[..., :1]).all()
    char = info["chars"][int(ex["label"])]
    assert any(np.array_equal(image[..., 0], glyphs.render(f.font(), char)) for f in _faces())
  assert os.path.isfile(os.path.join(path, build_cjk.ENCODER_RGB))


@pytest.mark.slow
def test_cjk_smoke_trains_from_the_rgb_encoder_and_refreshes_the_memory(tiny_cjk, tmp_path):
  """configs/cjk.py:smoke,memory on the tiny build (~1 min): the RGB encoder loads, the
  memory is filled from the model before update 0 (prefill: the 24 train images of the
  64 slots) and, with refresh_every=2, refilled before update 2. Oracle for the logged
  fill after each update (B = 16 enqueued per update): 40 / 64, 56 / 64, then back to
  24 + 16 = 40 / 64, 56 / 64; never refilled, it would reach 64 / 64."""
  from configs import cjk  # pylint: disable=g-import-not-at-top
  from xbm_jax.train import loop  # pylint: disable=g-import-not-at-top

  c = cjk.get_config(f"smoke,memory,data_dir={tiny_cjk}")
  c.xbm.refresh_every, c.train.progress, c.train.log_every = 2, False, 1
  c.drift.enabled = False  # one compile fewer
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(c, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  fills = [r["train/memory_fill"] for r in rows if "train/memory_fill" in r]
  assert fills == [40 / 64, 56 / 64, 40 / 64, 56 / 64]
  assert any("eval/test/recall@1" in r for r in rows)
