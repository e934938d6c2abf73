"""A glyph testbed with SOP's shape: >= 10,000 Han classes, 5 typefaces each.

Stanford Online Products has 11,318 train / 11,316 test classes of ~5 images; the embedded
glyph set (``glyphs.npz``) has 1,500 / 1,465 classes of ~18. This module renders the Han
ideographs of CJK Unified Ideographs (U+4E00-U+9FFF) and Extension A (U+3400-U+4DBF)
from installed fonts, one class per character and one image per typeface:

1. the charset leaves out every JIS X 0208 kanji (level 1: the embedded set's classes;
   level 2: the corpus the committed encoder was pretrained on), so the pretrained regime
   stays class-disjoint;
2. a face "has" a character only when its cmap maps the code point (read with fontTools),
   and the render is kept only when it draws ink that is not the face's .notdef box;
3. near-identical faces (``glyphs.dedupe_faces`` on a sample: the JP / SC / TC / KR
   variants of one family, Mono twins) are dropped; each class then draws ``per_class``
   distinct faces in a seeded order from the faces that have it (an exact duplicate
   render counts as no face), and a class with fewer is dropped;
4. classes are split (seeded, class-disjoint) into train / val / test.

``scripts/build_cjk.py`` drives it and writes a tfds dataset (``xbm_jax.data.dataset_writer``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np
from fontTools import ttLib

from xbm_jax.data import glyphs

HAN_RANGES = ((0x4E00, 0xA000), (0x3400, 0x4DC0))  # CJK Unified, Extension A
# ``han_chars(blocks=...)``: the hard testbed ("cjk_hard") renders CJK Unified only, and
# its sealed confirmation set ("cjk_sealed") Extension A only, so no character is shared.
HAN_BLOCKS = {
  "all": HAN_RANGES,
  "unified": ((0x4E00, 0xA000),),
  "ext_a": ((0x3400, 0x4DC0),),
}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def han_chars(exclude: Sequence[str] = (), blocks=HAN_RANGES) -> list[str]:
  """The Han ideographs of ``blocks`` (default ``HAN_RANGES``) minus every JIS X 0208
  kanji and ``exclude``."""
  banned = set(glyphs.jis_kanji_rows(16, 84)) | set(exclude)
  return [chr(c) for lo, hi in blocks for c in range(lo, hi) if chr(c) not in banned]


def cmap_chars(face: glyphs.Face) -> frozenset[str]:
  """The characters ``face``'s cmap maps to a glyph (its best Unicode cmap)."""
  number = face.index if face.path.lower().endswith((".ttc", ".otc")) else -1
  font = ttLib.TTFont(face.path, fontNumber=number, lazy=True)
  try:
    return frozenset(chr(c) for c in (font.getBestCmap() or {}))
  finally:
    font.close()


def covering_faces(
  faces: Sequence[glyphs.Face],
  chars: Sequence[str],
  *,
  min_coverage: int,
  exclude: str = "",
) -> list[tuple[glyphs.Face, frozenset[str]]]:
  """(face, its share of ``chars``) for faces whose cmap has >= ``min_coverage`` of them
  and whose name does not match the regex ``exclude``."""
  want = frozenset(chars)
  out = []
  for face in faces:
    if exclude and re.search(exclude, face.name):
      continue
    has = cmap_chars(face) & want
    if len(has) >= min_coverage:
      out.append((face, has))
  return out


# Words of a face name that name a weight, width, slant or regional variant, not a design.
_STYLE_WORDS = re.compile(
  r"\b(JP|KR|SC|TC|HK|CN|TW|MBE|Mono|Thin|ExtraLight|Light|DemiLight|Regular|Book|Medium|"
  r"SemiBold|DemiBold|Bold|ExtraBold|Black|Heavy|Italic|Oblique)\b"
)
_PREFERRED_WEIGHT = ("Regular", "Book", "Medium")


def family(name: str) -> str:
  """A face name without its weight / width / regional words: "Noto Serif CJK TC Bold"
  -> "Noto Serif CJK"."""
  return " ".join(_STYLE_WORDS.sub(" ", name).split())


def one_per_family(
  covered: Sequence[tuple[glyphs.Face, frozenset[str]]],
) -> list[tuple[glyphs.Face, frozenset[str]]]:
  """One face of each design family (``family``), in input order: the one covering the
  most characters, a regular weight first among equals. Weights of one design are
  near-copies of each other at 32 x 32, so they would make a class's images too alike."""
  best: dict[str, tuple[tuple[int, int], int]] = {}
  for i, (face, has) in enumerate(covered):
    rank = (len(has), any(w in face.name.split() for w in _PREFERRED_WEIGHT))
    key = family(face.name)
    if key not in best or rank > best[key][0]:
      best[key] = (rank, i)
  return [covered[i] for i in sorted(i for _, i in best.values())]


def distinct_faces(
  covered: Sequence[tuple[glyphs.Face, frozenset[str]]],
  *,
  dup_threshold: float,
  sample_chars: int,
  size: int,
  margin: int,
  seed: int,
) -> list[tuple[glyphs.Face, frozenset[str]]]:
  """``covered`` without near-identical faces (``glyphs.dedupe_faces`` over a seeded
  sample of the characters every face has, or of the union if none is shared)."""
  if not covered:
    return []
  common = frozenset.intersection(*(has for _, has in covered))
  pool = sorted(common) or sorted(frozenset.union(*(has for _, has in covered)))
  rng = np.random.default_rng(seed)
  sample = [pool[i] for i in sorted(rng.choice(len(pool), min(sample_chars, len(pool)), False))]
  renders, valid = zip(
    *[glyphs.render_face(f, sample, size=size, margin=margin) for f, _ in covered]
  )
  valid = [v & np.asarray([c in has for c in sample]) for v, (_, has) in zip(valid, covered)]
  keep, _ = glyphs.dedupe_faces(np.stack(renders), np.stack(valid), dup_threshold=dup_threshold)
  return [covered[i] for i in sorted(keep)]


def render_classes(
  faces: Sequence[tuple[glyphs.Face, frozenset[str]]],
  chars: Sequence[str],
  *,
  per_class: int,
  size: int = 32,
  margin: int = 2,
  min_ink: int = 32,
  seed: int = 0,
  log: Callable[[str], None] = print,
) -> tuple[list[str], np.ndarray, np.ndarray]:
  """``per_class`` distinct renders of each character, from faces drawn in a seeded order.

  Returns:
    kept chars (those with ``per_class`` renders, in input order); images uint8
    [len(kept) * per_class, size, size] (class-major); faces int64 [same] (index into
    ``faces``).
  """
  fonts = [f.font() for f, _ in faces]
  notdef = [glyphs.render(f, glyphs.UNASSIGNED, size=size, margin=margin) for f in fonts]
  kept, images, face_ids = [], [], []
  for n, char in enumerate(chars):
    # Each character's face order is seeded by (seed, code point) alone: a class keeps
    # its typefaces whatever else the charset holds.
    order = np.random.default_rng([seed, ord(char)]).permutation(len(faces))
    got: list[tuple[int, np.ndarray]] = []
    for fi in order:
      if char not in faces[fi][1]:
        continue
      im = glyphs.render(fonts[fi], char, size=size, margin=margin)
      if im.max() < min_ink or np.array_equal(im, notdef[fi]):
        continue
      if any(np.array_equal(im, other) for _, other in got):
        continue
      got.append((int(fi), im))
      if len(got) == per_class:
        break
    if len(got) == per_class:
      kept.append(char)
      face_ids += [fi for fi, _ in got]
      images += [im for _, im in got]
    if (n + 1) % 2000 == 0:
      log(f"  {n + 1}/{len(chars)} characters, {len(kept)} classes kept")
  shape = (0, size, size)
  out = np.stack(images).astype(np.uint8) if images else np.zeros(shape, np.uint8)
  return kept, out, np.asarray(face_ids, np.int64)


def split_classes(n: int, *, num_val: int, num_train: int | None, seed: int) -> np.ndarray:
  """int8 [n]: each class's split (0 train, 1 val, 2 test), a seeded class permutation.

  ``num_val`` classes go to val; of the rest, ``num_train`` (half if None) to train and
  the remainder to test.
  """
  if num_val >= n:
    raise ValueError(f"num_val={num_val} leaves no train or test class of {n}")
  rest = n - num_val
  n_train = rest // 2 if num_train is None else num_train
  if not 0 < n_train < rest:
    raise ValueError(f"num_train={n_train} must leave train and test classes of {rest}")
  perm = np.random.default_rng(seed).permutation(n)
  split = np.full(n, SPLIT_IDS["test"], np.int8)
  split[perm[:num_val]] = SPLIT_IDS["val"]
  split[perm[num_val : num_val + n_train]] = SPLIT_IDS["train"]
  return split


def rgb_params(variables: dict) -> dict:
  """A 1-channel model's variables for 3-channel input: each first-conv kernel whose
  input depth is 1 becomes [.., 3, out] = kernel / 3 per channel, so a grey image stored
  as RGB (R = G = B) gives the same activations as the 1-channel image."""

  def fix(node):
    if isinstance(node, dict):
      return {k: fix(v) for k, v in node.items()}
    a = np.asarray(node)
    if a.ndim == 4 and a.shape[2] == 1:
      return np.repeat(a / 3.0, 3, axis=2).astype(a.dtype)
    return node

  return fix(variables)


# Render-time degradation (the hard testbed): each image draws its own affine jitter,
# stroke weight, blur, noise and occlusion, seeded by (seed, code point, image index).


@dataclasses.dataclass(frozen=True)
class Degradation:
  """Ranges of the per-image degradation at ``strength`` 1 (every range scales with it;
  strength 0 is the identity). Angles in degrees, lengths in pixels of the 32 x 32 image.

  Applied in this order: affine (rotation, anisotropic scale, shear, translation; bilinear,
  about the centre), stroke weight (grey dilation or erosion by a 2 x 2 square, blended
  with the image by a drawn weight), Gaussian blur, occlusion (a rectangle set to 0 or
  255), additive Gaussian noise; then clipped to 0..255 and rounded to uint8.
  """

  strength: float = 1.0
  rotate: float = 12.0
  scale: float = 0.15  # each axis' scale in [1 - s, 1 + s]
  shear: float = 0.2
  shift: float = 2.5
  stroke: float = 1.0  # blend weight of the dilated / eroded image, in [0, stroke]
  blur: float = 1.0  # sigma in [0, blur]
  occlude_p: float = 0.5
  occlude_size: float = 0.45  # the rectangle's sides in [0.15, occlude_size] x image side
  noise: float = 24.0  # std in [0, noise] grey levels


def degradation_params(deg: Degradation, rng: np.random.Generator) -> dict:
  """One image's draws (a plain dict; ``degrade_image`` applies them)."""
  s = deg.strength
  u = lambda a: float(rng.uniform(-a, a))
  occ_side = lambda: float(rng.uniform(0.15, max(0.15, deg.occlude_size)))
  return {
    "angle": u(deg.rotate * s),
    "sx": 1.0 + u(deg.scale * s),
    "sy": 1.0 + u(deg.scale * s),
    "shear": u(deg.shear * s),
    "tx": u(deg.shift * s),
    "ty": u(deg.shift * s),
    "stroke": u(deg.stroke * min(s, 1.0)),  # > 0 dilate, < 0 erode
    "blur": float(rng.uniform(0.0, deg.blur * s)),
    "occlude": bool(rng.uniform() < deg.occlude_p * min(s, 1.0)),
    "occ_h": occ_side(),
    "occ_w": occ_side(),
    "occ_y": float(rng.uniform()),
    "occ_x": float(rng.uniform()),
    "occ_fill": float(rng.choice([0.0, 255.0])),
    "noise": float(rng.uniform(0.0, deg.noise * s)),
    "noise_seed": int(rng.integers(2**31)),
  }


def affine_matrix(p: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(matrix, offset) for ``scipy.ndimage.affine_transform`` (output -> input coordinates,
  (row, col)): the inverse of rotate(angle) . shear . scale(sy, sx) about the centre,
  then a shift by (ty, tx)."""
  a = np.deg2rad(p["angle"])
  rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
  fwd = rot @ np.array([[1.0, p["shear"]], [0.0, 1.0]]) @ np.diag([p["sy"], p["sx"]])
  inv = np.linalg.inv(fwd)
  c = np.full(2, (size - 1) / 2.0)
  shift = np.array([p["ty"], p["tx"]])
  return inv, c - inv @ (c + shift)


def degrade_image(image: np.ndarray, p: dict) -> np.ndarray:
  """uint8 [H, W] -> uint8 [H, W] under the draws ``p`` (``degradation_params``)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  size = image.shape[0]
  x = image.astype(np.float64)
  m, off = affine_matrix(p, size)
  x = ndimage.affine_transform(x, m, offset=off, order=1, mode="constant", cval=0.0)
  if p["stroke"] > 0:
    x = x + p["stroke"] * (ndimage.grey_dilation(x, size=(2, 2)) - x)
  elif p["stroke"] < 0:
    x = x - p["stroke"] * (ndimage.grey_erosion(x, size=(2, 2)) - x)
  if p["blur"] > 0:
    x = ndimage.gaussian_filter(x, p["blur"], mode="constant")
  if p["occlude"]:
    h = max(1, int(round(p["occ_h"] * size)))
    w = max(1, int(round(p["occ_w"] * size)))
    y0 = int(p["occ_y"] * (size - h + 1))
    x0 = int(p["occ_x"] * (size - w + 1))
    x[y0 : y0 + h, x0 : x0 + w] = p["occ_fill"]
  if p["noise"] > 0:
    x = x + np.random.default_rng(p["noise_seed"]).normal(0.0, p["noise"], x.shape)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def degrade_classes(
  images: np.ndarray, chars: Sequence[str], per_class: int, deg: Degradation, *, seed: int
) -> np.ndarray:
  """Each image of ``render_classes``' class-major output degraded by its own draws,
  seeded by (seed, code point, index in its class): a class keeps its degradations
  whatever else the charset holds."""
  if deg.strength == 0:
    return images.copy()
  out = np.empty_like(images)
  for c, char in enumerate(chars):
    for j in range(per_class):
      rng = np.random.default_rng([seed, ord(char), j, 1])
      i = c * per_class + j
      out[i] = degrade_image(images[i], degradation_params(deg, rng))
  return out
