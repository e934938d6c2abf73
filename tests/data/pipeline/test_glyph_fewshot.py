"""Few-shot glyph splits (train_fit5 / val5) and the disjoint pretraining characters.

No fonts and no rendered corpus needed: the corpus is only its character list here.
"""

import numpy as np
import pytest

from xbm_jax.data import glyph_corpus, glyphs


def test_few_shot_mask_caps_each_class_with_independent_draws():
  labels = np.array([0] * 7 + [1] * 3 + [2] * 5)
  keep = glyphs.few_shot_mask(labels, 5, seed=1)
  np.testing.assert_array_equal(np.bincount(labels[keep]), [5, 3, 5])
  # A class's draw depends on (seed, label) only: dropping class 1 leaves class 0's rows.
  others = labels != 1
  np.testing.assert_array_equal(glyphs.few_shot_mask(labels[others], 5, seed=1), keep[others])
  assert not np.array_equal(
    glyphs.few_shot_mask(labels, 5, seed=2)[:7], keep[:7]
  ) or not np.array_equal(glyphs.few_shot_mask(labels, 5, seed=3)[:7], keep[:7])


@pytest.mark.parametrize("few,full", [("train_fit5", "train_fit"), ("val5", "val")])
def test_few_shot_split_is_a_capped_subset_of_its_carved_split(few, full):
  a, b = glyphs.load_arrays(few), glyphs.load_arrays(full)
  np.testing.assert_array_equal(np.unique(a["labels"]), np.unique(b["labels"]))
  counts = np.bincount(a["labels"])[np.unique(a["labels"])]
  full_counts = np.bincount(b["labels"])[np.unique(b["labels"])]
  np.testing.assert_array_equal(counts, np.minimum(full_counts, 5))
  # Every kept image is that class's image of that typeface in the full split.
  full_rows = {(int(l), int(f)): i for i, (l, f) in enumerate(zip(b["labels"], b["faces"]))}
  for im, l, f in zip(a["images"][::97], a["labels"][::97], a["faces"][::97]):
    np.testing.assert_array_equal(im, b["images"][full_rows[(int(l), int(f))]])
  again = glyphs.load_arrays(few)
  np.testing.assert_array_equal(again["faces"], a["faces"])
  np.testing.assert_array_equal(again["labels"], a["labels"])


def test_train_fit5_matches_the_pretrained_configs_memory_size():
  from xbm_jax.configs import glyphs as glyph_config  # pylint: disable=g-import-not-at-top

  c = glyph_config.get_config("study,pretrained")
  assert c.xbm.size == len(glyphs.load_arrays(c.input.train_split)["labels"]) == 6000


def test_corpus_chars_are_jis_level2_and_disjoint_from_the_target():
  chars = glyph_corpus.corpus_chars()
  assert len(chars) == len(set(chars)) == 3390
  # Oracle: each encodes back to a JIS X 0208 row 48-84 (EUC-JP lead byte 0xD0-0xF4).
  assert all(0xD0 <= c.encode("euc_jp")[0] <= 0xF4 for c in chars)
  target = set(glyphs.load_arrays("train")["chars"].tolist())
  assert len(target) == 2965 and not target & set(chars)
  assert not set(glyphs.jis_level1_kanji()) & set(chars)
  assert glyph_corpus.corpus_chars(exclude=chars[:10]) == chars[10:]
