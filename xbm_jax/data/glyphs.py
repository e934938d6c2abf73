"""Embedded glyph dataset: each character a class, each typeface one image of it.

An Omniglot-like offline default for smoke tests and demos: no download, no system fonts
needed at load time. ``load_embedded(split)`` reads the committed prebuilt arrays in
``glyphs_data/glyphs.npz``; ``build(...)`` (driven by ``scripts/build_glyphs.py``) renders
them from installed fonts:

1. find every face (a .ttc/.otc collection holds several: each face index is one typeface);
2. render a sample of characters per face; drop placeholders (the face's .notdef, rendered
   from an unassigned code point, U+10FFFD, or one image drawn for many characters) and
   blank renders;
3. drop near-identical typefaces (two faces whose sample renders differ by a mean absolute
   pixel difference < ``dup_threshold``: many packages ship the same outlines under several
   names, e.g. proportional and fixed-width variants); keep the face with more coverage;
4. render every character from every kept face, drop exact duplicate images within a class,
   keep classes with >= ``min_faces`` typefaces, and split the classes (seeded) into a
   class-disjoint train / test split.

Renders are centred on their ink box and scaled to fit ``size - 2 * margin`` (aspect kept),
so faces with different metrics give comparable images.
Labels are global class ids (index into ``chars``), so they are disjoint across splits.
"""

from __future__ import annotations

import dataclasses
import functools
import lzma
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "glyphs_data", "glyphs.npz")
FONT_EXTS = (".ttf", ".otf", ".ttc", ".otc")
UNASSIGNED = "\U0010fffd"  # a private-use code point no CJK font maps: renders .notdef
_RENDER_PX = 64  # render large, then downsample: smooth anti-aliasing


def jis_kanji_rows(first: int, last: int) -> list[str]:
  """The JIS X 0208 kanji of rows ``first..last`` (inclusive), decoded via Python's euc_jp
  codec; cells a row leaves unassigned are skipped."""
  chars = []
  for row in range(first, last + 1):
    for cell in range(1, 95):
      try:
        chars.append(bytes([0xA0 + row, 0xA0 + cell]).decode("euc_jp"))
      except UnicodeDecodeError:  # e.g. row 47 ends at cell 51, row 84 at cell 6
        pass
  return chars


def jis_level1_kanji() -> list[str]:
  """The 2,965 JIS X 0208 level-1 kanji (rows 16-47)."""
  return jis_kanji_rows(16, 47)


def unicode_range(start: int, stop: int) -> list[str]:
  """Characters with code points in [start, stop)."""
  return [chr(c) for c in range(start, stop)]


@dataclasses.dataclass(frozen=True)
class Face:
  """One typeface: a font file and the face index inside it (0 unless a collection)."""

  path: str
  index: int
  name: str

  def font(self, px: int = _RENDER_PX) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(self.path, size=px, index=self.index)


def find_faces(font_dirs: Sequence[str] | str) -> list[Face]:
  """Every face of every font file under ``font_dirs`` (sorted by path, then index)."""
  if isinstance(font_dirs, str):
    font_dirs = [font_dirs]
  paths = []
  for d in font_dirs:
    if os.path.isfile(d):
      paths.append(d)
      continue
    for root, _, files in os.walk(d):
      paths += [os.path.join(root, f) for f in files if f.lower().endswith(FONT_EXTS)]
  faces = []
  for path in sorted(set(os.path.realpath(p) for p in paths)):
    index = 0
    while True:
      try:
        font = ImageFont.truetype(path, size=_RENDER_PX, index=index)
      except OSError:  # past the last face of a collection (or an unreadable file)
        break
      family, style = font.getname()
      faces.append(Face(path, index, f"{family} {style}".strip()))
      if not path.lower().endswith((".ttc", ".otc")):
        break
      index += 1
  return faces


def render(
  font: ImageFont.FreeTypeFont, char: str, *, size: int = 32, margin: int = 2
) -> np.ndarray:
  """uint8 [size, size] white-on-black render of ``char``, centred on its ink box.

  Blank (all-zero) when the face draws no ink for ``char``.
  """
  canvas = 3 * _RENDER_PX
  img = Image.new("L", (canvas, canvas), 0)
  try:
    ImageDraw.Draw(img).text((canvas // 2, canvas // 2), char, fill=255, font=font, anchor="mm")
  except OSError:  # broken hinting program / bitmap-only strike: treat as no glyph
    pass
  box = img.getbbox()
  out = Image.new("L", (size, size), 0)
  if box is None:
    return np.asarray(out)
  glyph = img.crop(box)
  inner = size - 2 * margin
  scale = inner / max(glyph.width, glyph.height)
  w = max(1, round(glyph.width * scale))
  h = max(1, round(glyph.height * scale))
  glyph = glyph.resize((w, h), Image.LANCZOS)
  out.paste(glyph, ((size - w) // 2, (size - h) // 2))
  return np.asarray(out)


def render_face(
  face: Face,
  chars: Sequence[str],
  *,
  size: int = 32,
  margin: int = 2,
  min_ink: int = 32,
  max_shared: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
  """Renders ``chars`` from one face.

  Returns:
    images: uint8 [len(chars), size, size].
    valid: bool [len(chars)]: False for placeholders (equal to the face's .notdef render,
      or one image shared by more than ``max_shared`` characters: fallback fonts such as
      Last Resort draw one box per Unicode block) and blank renders (max < ``min_ink``).
  """
  font = face.font()
  notdef = render(font, UNASSIGNED, size=size, margin=margin)
  images = np.stack([render(font, c, size=size, margin=margin) for c in chars])
  blank = images.reshape(len(chars), -1).max(axis=1) < min_ink
  placeholder = (
    (images == notdef[None]).all(axis=(1, 2))
    if notdef.max() >= min_ink
    else np.zeros(len(chars), bool)
  )
  _, inverse, counts = np.unique(
    images.reshape(len(chars), -1), axis=0, return_inverse=True, return_counts=True
  )
  shared = counts[inverse.reshape(-1)] > max_shared
  return images, ~(blank | placeholder | shared)


def dedupe_faces(
  renders: np.ndarray, valid: np.ndarray, *, dup_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
  """Greedy choice of typefaces that are not near-identical to an already kept one.

  Args:
    renders: uint8 [F, S, H, W] sample renders of F faces over S characters.
    valid: bool [F, S].
    dup_threshold: faces whose mean |difference| / 255 over their common valid sample
      characters is below this are duplicates.
  Returns:
    keep: int64 [K] indices of kept faces, most-covering first.
    dup_of: int64 [F], the kept face each dropped face duplicates (-1 for kept faces,
      -2 for faces with no valid sample glyph).
  """
  f = len(renders)
  order = sorted(range(f), key=lambda i: -int(valid[i].sum()))  # stable: ties by index
  x = renders.astype(np.float32) / 255.0
  keep, dup_of = [], np.full(f, -1, np.int64)
  for i in order:
    if not valid[i].any():
      dup_of[i] = -2  # no usable glyph at all
      continue
    for k in keep:
      common = valid[i] & valid[k]
      if common.sum() >= max(1, valid[i].sum() // 2):
        diff = np.abs(x[i, common] - x[k, common]).mean()
        if diff < dup_threshold:
          dup_of[i] = k
          break
    else:
      keep.append(i)
  return np.asarray(keep, np.int64), dup_of


def select_diverse(
  renders: np.ndarray, valid: np.ndarray, candidates: np.ndarray, max_faces: int
) -> np.ndarray:
  """Greedy farthest-point choice of ``max_faces`` of ``candidates`` (most-covering first).

  Each step adds the face whose smallest mean |difference| to the chosen faces is largest,
  so a size budget is spent on distinct styles rather than on weights of one family.
  """
  candidates = list(candidates)
  if len(candidates) <= max_faces:
    return np.asarray(sorted(candidates), np.int64)
  x = renders.astype(np.float32) / 255.0

  def dist(a, b):
    common = valid[a] & valid[b]
    return float(np.abs(x[a, common] - x[b, common]).mean()) if common.any() else 1.0

  chosen = [candidates[0]]
  mind = {c: dist(c, chosen[0]) for c in candidates[1:]}
  while len(chosen) < max_faces:
    nxt = max(mind, key=lambda c: (mind[c], -c))
    chosen.append(nxt)
    del mind[nxt]
    for c in mind:
      mind[c] = min(mind[c], dist(c, nxt))
  return np.asarray(sorted(chosen), np.int64)


def build(
  faces: Sequence[Face],
  chars: Sequence[str],
  *,
  size: int = 32,
  margin: int = 2,
  min_faces: int = 5,
  num_train_classes: int | None = None,
  train_fraction: float = 0.5,
  dup_threshold: float = 0.07,
  max_faces: int | None = None,
  sample_chars: int = 200,
  seed: int = 0,
  log=print,
) -> dict[str, np.ndarray]:
  """Renders and filters a glyph dataset (see the module docstring for the steps).

  Returns a dict of arrays (what ``glyphs.npz`` holds):
    images uint8 [N, size, size]; labels int64 [N] global class id; faces int64 [N] index
    into face_names; split int8 [N] (0 train, 1 test); chars <U1 [C]; face_names <U [F'];
    face_paths <U [F']; face_indices int64 [F'] (face index inside a collection).
  """
  if not faces:
    raise ValueError("no font faces given to glyphs.build")
  rng = np.random.default_rng(seed)
  chars = list(chars)
  sample = [
    chars[i] for i in sorted(rng.choice(len(chars), min(sample_chars, len(chars)), replace=False))
  ]
  sample_r, sample_v = zip(*[render_face(f, sample, size=size, margin=margin) for f in faces])
  keep, dup_of = dedupe_faces(np.stack(sample_r), np.stack(sample_v), dup_threshold=dup_threshold)
  for i, d in enumerate(dup_of):
    if d >= 0:
      log(f"drop face {faces[i].name} ({faces[i].path}): near-identical to {faces[d].name}")
    elif d == -2:
      log(f"drop face {faces[i].name} ({faces[i].path}): no usable glyph in the sample")
  if max_faces is not None and len(keep) > max_faces:
    keep = select_diverse(np.stack(sample_r), np.stack(sample_v), keep, max_faces)
    log(f"kept the {max_faces} most distinct typefaces")
  kept = [faces[i] for i in sorted(keep)]
  log(f"{len(kept)} typefaces kept of {len(faces)}")

  per_class: list[list[tuple[int, np.ndarray]]] = [[] for _ in chars]
  for fi, face in enumerate(kept):
    images, valid = render_face(face, chars, size=size, margin=margin)
    for ci in np.flatnonzero(valid):
      # Exact duplicates inside a class (two faces sharing this one outline) add nothing.
      if not any(np.array_equal(images[ci], im) for _, im in per_class[ci]):
        per_class[ci].append((fi, images[ci]))
    log(f"  rendered {face.name}: {int(valid.sum())}/{len(chars)} glyphs")

  classes = [c for c in range(len(chars)) if len(per_class[c]) >= min_faces]
  if not classes:
    raise ValueError(
      f"no class has >= min_faces={min_faces} typefaces ({len(kept)} typefaces kept)"
    )
  perm = rng.permutation(len(classes))
  n_train = (
    int(round(train_fraction * len(classes)))
    if num_train_classes is None
    else min(num_train_classes, len(classes))
  )
  is_test = np.zeros(len(classes), bool)
  is_test[perm[n_train:]] = True
  images, labels, face_ids, split = [], [], [], []
  new_chars = [chars[c] for c in classes]
  for new_id, (c, test) in enumerate(zip(classes, is_test)):
    for fi, im in per_class[c]:
      images.append(im)
      labels.append(new_id)
      face_ids.append(fi)
      split.append(int(test))
  return {
    "images": np.stack(images).astype(np.uint8),
    "labels": np.asarray(labels, np.int64),
    "faces": np.asarray(face_ids, np.int64),
    "split": np.asarray(split, np.int8),
    "chars": np.asarray(new_chars),
    "face_names": np.asarray([f.name for f in kept]),
    "face_paths": np.asarray([f.path for f in kept]),
    "face_indices": np.asarray([f.index for f in kept], np.int64),
  }


def encode_images(images: np.ndarray, bits: int = 8) -> np.ndarray:
  """uint8 [N, H, W] -> uint8 [M] lzma-compressed bytes (``bits`` 8 or 4 grey levels).

  xz compresses these glyphs ~2x better than npz's zlib, and 4-bit (16 grey levels, two
  pixels a byte) halves them again at no visible cost for anti-aliased glyph edges.
  """
  if bits == 8:
    payload = images.astype(np.uint8).tobytes()
  elif bits == 4:
    q = (images.astype(np.uint16) * 15 + 127) // 255  # nearest of 16 levels
    flat = q.astype(np.uint8).reshape(-1)
    if flat.size % 2:
      flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    payload = ((flat[0::2] << 4) | flat[1::2]).tobytes()
  else:
    raise ValueError(f"image bits must be 8 or 4, got {bits}")
  return np.frombuffer(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME), np.uint8)


def decode_images(blob: np.ndarray, shape: Sequence[int], bits: int) -> np.ndarray:
  """Inverse of ``encode_images``: uint8 [N, H, W] (4-bit levels expanded to 0..255)."""
  raw = np.frombuffer(lzma.decompress(np.asarray(blob, np.uint8).tobytes()), np.uint8)
  n = int(np.prod(shape))
  if bits == 4:
    q = np.empty(raw.size * 2, np.uint8)
    q[0::2], q[1::2] = raw >> 4, raw & 15
    raw = q[:n] * np.uint8(17)
  return raw[:n].reshape(tuple(int(d) for d in shape))


def save(data: dict[str, np.ndarray], path: str = DATA_FILE, *, bits: int = 8) -> None:
  """Writes ``build``'s arrays to ``path`` (.npz; the images xz-compressed inside)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  out = {k: v for k, v in data.items() if k != "images"}
  out["images_xz"] = encode_images(data["images"], bits)
  out["images_shape"] = np.asarray(data["images"].shape, np.int64)
  out["images_bits"] = np.asarray(bits, np.int64)
  np.savez_compressed(path, **out)


SPLITS = {"train": 0, "test": 1}
# A validation split carved from the TRAIN classes (for tuning without touching test):
# a fixed, seeded 20% of the train classes is "val", the rest "train_fit".
CARVED_SPLITS = {"train_fit": False, "val": True}
VAL_FRACTION, VAL_SEED = 0.2, 2020
# Few-shot views of the carved splits (the memory study's "paper regime": SOP has ~5 images per
# class): the same classes, each keeping a fixed seeded subset of <= FEW_SHOT typefaces.
FEW_SHOT_SPLITS = {"train_fit5": "train_fit", "val5": "val"}
FEW_SHOT, FEW_SHOT_SEED = 5, 5


@functools.lru_cache(maxsize=2)
def _load_all(path: str, mtime: float) -> dict[str, np.ndarray]:
  del mtime  # part of the cache key only: a rebuilt file is read again
  with np.load(path) as z:
    out = {k: z[k] for k in z.files if k != "images_xz"}
    out["images"] = decode_images(z["images_xz"], z["images_shape"], int(z["images_bits"]))
  return out


def load_arrays(split: str, path: str = DATA_FILE) -> dict[str, np.ndarray]:
  """This split's arrays: images uint8 [n, H, W, 1], labels int64 [n], faces int64 [n],
  plus the whole set's chars <U1 [C] (label -> character) and face_names."""
  known = {**SPLITS, **CARVED_SPLITS, **FEW_SHOT_SPLITS}
  if split not in known:
    raise ValueError(f"glyph split must be one of {sorted(known)}, got {split!r}")
  if split in FEW_SHOT_SPLITS:
    a = load_arrays(FEW_SHOT_SPLITS[split], path)
    keep = few_shot_mask(a["labels"], FEW_SHOT, FEW_SHOT_SEED)
    return {k: (v[keep] if k in ("images", "labels", "faces") else v) for k, v in a.items()}
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"embedded glyph data missing: {path} (rebuild with scripts/build_glyphs.py)"
    )
  z = _load_all(path, os.path.getmtime(path))
  sel = z["split"] == SPLITS.get(split, SPLITS["train"])
  if split in CARVED_SPLITS:
    sel &= np.isin(z["labels"], val_classes(z["labels"][sel])) == CARVED_SPLITS[split]
  return {
    "images": z["images"][sel][..., None],
    "labels": z["labels"][sel],
    "faces": z["faces"][sel],
    "chars": z["chars"],
    "face_names": z["face_names"],
  }


def val_classes(train_labels: np.ndarray) -> np.ndarray:
  """The train classes held out as "val": a fixed seeded VAL_FRACTION of them."""
  classes = np.unique(train_labels)
  n_val = int(round(VAL_FRACTION * len(classes)))
  return np.sort(np.random.default_rng(VAL_SEED).choice(classes, n_val, replace=False))


def few_shot_mask(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
  """bool [n]: at most ``k`` rows of each class, a seeded draw per class.

  Each class's draw is seeded by (seed, label) alone, so a class keeps the same typefaces
  whatever other classes the split holds.
  """
  labels = np.asarray(labels)
  keep = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    rows = np.flatnonzero(labels == c)
    if len(rows) > k:
      rows = np.random.default_rng([seed, int(c)]).choice(rows, k, replace=False)
    keep[rows] = True
  return keep


def load_embedded(split: str, path: str = DATA_FILE):
  """The committed glyph dataset as an ``ArraySource`` (uint8 [32, 32, 1] images).

  Labels are global class ids (a character's index in the ``chars`` array), disjoint
  between "train" and "test". Needs no system fonts.
  """
  from xbm_jax.data import sources  # pylint: disable=g-import-not-at-top

  a = load_arrays(split, path)
  return sources.ArraySource(a["images"], a["labels"])
