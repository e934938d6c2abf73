"""A pretraining corpus of CJK characters disjoint from the glyph target's classes.

The XBM paper fine-tunes an ImageNet-pretrained network on classes it never saw. The
miniature analog here: classification pretraining over JIS X 0208 level-2 kanji (rows
48-84, 3,390 characters; never one of the 2,965 level-1 target kanji), rendered with the
target's own machinery (``glyphs.find_faces`` / ``glyphs.build``: same renderer, same
placeholder and near-duplicate-face filters).

The corpus (~50k images) is rebuilt at prepare time from installed Debian font packages
(see ``glyphs_data/FONTS.md``) into a cache folder outside the repository
(``default_path()``); it is never committed, and tests and CI never need it.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import numpy as np

from xbm_jax.data import glyphs

CACHE_DIR = os.path.join(
  os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "xbm_jax"
)


def default_path() -> str:
  """Where ``scripts/pretrain_glyphs.py`` keeps the rendered corpus (.npz)."""
  return os.path.join(CACHE_DIR, "glyph_corpus_jis2.npz")


def jis_level2_kanji() -> list[str]:
  """The 3,390 JIS X 0208 level-2 kanji (rows 48-84)."""
  return glyphs.jis_kanji_rows(48, 84)


def corpus_chars(exclude: Iterable[str] = ()) -> list[str]:
  """Level-2 kanji minus the level-1 target kanji and minus ``exclude`` (e.g. the
  committed dataset's ``chars``): the pretraining classes, in JIS order.

  JIS levels are disjoint by construction; the explicit difference guards against a codec
  mapping two code points to one character, so "disjoint" never rests on that assumption.
  """
  banned = set(glyphs.jis_level1_kanji()) | set(exclude)
  seen, out = set(), []
  for c in jis_level2_kanji():
    if c not in banned and c not in seen:
      seen.add(c)
      out.append(c)
  return out


def candidate_faces(
  font_dirs: Sequence[str],
  *,
  exclude: str = "KanjiStrokeOrders",
  chars: Sequence[str] | None = None,
) -> list[glyphs.Face]:
  """Installed faces that draw >= 2 of the first 8 corpus characters (the same cheap
  pre-filter as scripts/build_glyphs.py; ``exclude``: a regex of face names to skip)."""
  probe = list(chars or corpus_chars())[:8]
  faces = [f for f in glyphs.find_faces(font_dirs) if not (exclude and re.search(exclude, f.name))]
  return [f for f in faces if glyphs.render_face(f, probe)[1].sum() >= 2]


def build_corpus(
  faces: Sequence[glyphs.Face],
  *,
  exclude: Iterable[str] = (),
  min_faces: int = 5,
  max_faces: int | None = 24,
  dup_threshold: float = 0.07,
  seed: int = 0,
  log=print,
) -> dict[str, np.ndarray]:
  """Renders the corpus with ``glyphs.build``: every class in the train split (split 0).

  Returns ``glyphs.build``'s arrays (images uint8 [N, 32, 32], labels, faces, chars, ...).
  """
  chars = corpus_chars(exclude)
  return glyphs.build(
    faces,
    chars,
    size=32,
    margin=2,
    min_faces=min_faces,
    num_train_classes=len(chars),
    dup_threshold=dup_threshold,
    max_faces=max_faces,
    seed=seed,
    log=log,
  )


def load(path: str | None = None) -> dict[str, np.ndarray]:
  """The cached corpus: images uint8 [N, 32, 32, 1], labels int64 [N] (0..C-1), chars."""
  path = path or default_path()
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"no glyph corpus at {path}: build it with "
      "scripts/pretrain_glyphs.py --build (needs CJK fonts installed)"
    )
  return glyphs.load_arrays("train", path)
