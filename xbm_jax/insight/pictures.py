"""Retrieval pictures: each query followed by its top-K neighbours, framed by outcome,
under a caption that says how to read them; tiny images (32 px glyphs) are enlarged
(nearest neighbour) so that every cell is at least `min_size` pixels.

    idx = choose_queries(8, len(test_images), seed=0)      # the same queries every run
    topk, correct = retrieve(emb[idx], emb, labels[idx], labels, k=5, self_index=idx)
    save_png(path, retrieval_grid(images[idx], images, topk, correct))
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Tuple

import numpy as np

GREEN = (0, 200, 0)
RED = (220, 0, 0)
GRAY = (128, 128, 128)
WHITE = (255, 255, 255)
INK = (32, 32, 32)
CAPTION = "query | top-{k} neighbours; green border = same class, red = different"
MIN_SIZE = 64  # pixels: smaller images are enlarged by a whole factor
FONT_SIZE = 14


def _as_rgb(images: np.ndarray, what: str) -> np.ndarray:
  """uint8 [N, H, W], [N, H, W, 1], [N, H, W, 3] (or 4: alpha dropped) -> [N, H, W, 3]."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"{what} must be uint8, got {images.dtype}")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
    raise ValueError(
      f"{what} must be [N, H, W] or [N, H, W, C] with C in 1/3/4, got shape {images.shape}"
    )
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  return images[..., :3]


def retrieval_grid(
  query_images: np.ndarray,
  gallery_images: np.ndarray,
  topk: np.ndarray,
  correct: np.ndarray,
  *,
  border: int = 2,
  pad: int = 2,
  background: Tuple[int, int, int] = WHITE,
  min_size: int = MIN_SIZE,
  caption: Optional[str] = CAPTION,
  title: Optional[str] = None,
) -> np.ndarray:
  """Lays out one row per query: the query, then its K retrieved gallery images.

  Args:
    query_images: uint8 ``[Q, H, W]`` or ``[Q, H, W, C]``.
    gallery_images: uint8 ``[G, H, W(, C)]`` with the same H, W.
    topk: int ``[Q, K]`` indices into the gallery, best first; -1 leaves a blank cell.
    correct: bool ``[Q, K]``, True where the retrieved image shares the query's label.
    border: frame width in pixels: gray for the query, green correct, red incorrect.
    pad: background pixels between cells and around the grid.
    min_size: images smaller than this (their short side) are enlarged by the
      smallest whole factor f that reaches it, each pixel an f x f block.
    caption: text above the grid (``{k}`` becomes K, wrapped to the grid's width);
      None for none.
    title: a line above the caption naming what is shown (see `run_title`).

  Returns:
    uint8 ``[Q*(H'+2b) + (Q+1)*pad, (K+1)*(W'+2b) + (K+2)*pad, 3]`` with
    ``H' = f*H, W' = f*W``, below the caption's rows when there is one.
  """
  q = _as_rgb(query_images, "query_images")
  g = _as_rgb(gallery_images, "gallery_images")
  topk = np.asarray(topk)
  correct = np.asarray(correct, bool)
  if q.shape[1:3] != g.shape[1:3]:
    raise ValueError(
      f"query images are {q.shape[1:3]} but gallery images are {g.shape[1:3]} (H, W must match)"
    )
  if topk.ndim != 2 or topk.shape[0] != q.shape[0] or correct.shape != topk.shape:
    raise ValueError(
      f"topk {topk.shape} and correct {correct.shape} must both be [Q={q.shape[0]}, K]"
    )
  if topk.size and (topk.max() >= g.shape[0] or topk.min() < -1):
    raise ValueError(
      f"topk indices must lie in [-1, {g.shape[0]}), got range [{topk.min()}, {topk.max()}]"
    )
  if border < 0 or pad < 0:
    raise ValueError(f"border and pad must be >= 0, got {border}, {pad}")
  f = max(1, -(-int(min_size) // max(1, min(q.shape[1:3]))))  # ceil
  if f > 1:  # nearest neighbour: each pixel an f x f block
    q, g = (np.repeat(np.repeat(x, f, axis=1), f, axis=2) for x in (q, g))
  n_q, h, w = q.shape[:3]
  k = topk.shape[1]
  ch, cw = h + 2 * border, w + 2 * border
  out = np.empty((n_q * ch + (n_q + 1) * pad, (k + 1) * cw + (k + 2) * pad, 3), np.uint8)
  out[...] = np.asarray(background, np.uint8)

  def put(row, col, img, color):
    y = pad + row * (ch + pad)
    x = pad + col * (cw + pad)
    out[y : y + ch, x : x + cw] = np.asarray(color, np.uint8)
    out[y + border : y + border + h, x + border : x + border + w] = img

  for i in range(n_q):
    put(i, 0, q[i], GRAY)
    for j in range(k):
      if topk[i, j] >= 0:
        put(i, j + 1, g[topk[i, j]], GREEN if correct[i, j] else RED)
  if caption is not None:
    out = add_caption(out, caption.format(k=k), pad=pad, background=background)
  if title:
    out = add_caption(out, title, pad=pad, background=background)
  return out


def run_title(workdir: str, evaluator: str, step: int) -> str:
  """`"xbm_glyphs: glyphs at step 1,200"`: which run, evaluation and step a picture shows."""
  return f"{os.path.basename(os.path.normpath(workdir))}: {evaluator} at step {step:,}"


def add_caption(
  img: np.ndarray, text: str, *, pad: int = 2, background: Tuple[int, int, int] = WHITE
) -> np.ndarray:
  """``img`` (uint8 ``[H, W, 3]``) below ``text`` in dark ink, word-wrapped to W."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top

  try:
    font = ImageFont.load_default(size=FONT_SIZE)
  except TypeError:  # Pillow < 10.1: the fixed bitmap font
    font = ImageFont.load_default()
  width = img.shape[1]
  fits = lambda line: (
    ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(line, font=font) <= width - 2 * pad - 2
  )
  lines = []
  for word in text.split():
    if lines and fits(f"{lines[-1]} {word}"):
      lines[-1] = f"{lines[-1]} {word}"
    else:
      lines.append(word)
  step = FONT_SIZE + 4
  strip = Image.new("RGB", (width, pad + 2 + step * len(lines)), background)
  draw = ImageDraw.Draw(strip)
  for i, line in enumerate(lines):
    draw.text((pad + 1, pad + 2 + i * step), line, fill=INK, font=font)
  return np.concatenate([np.asarray(strip, np.uint8), img], axis=0)


def choose_queries(n_queries: int, n: int, seed: int = 0) -> np.ndarray:
  """Sorted int64 ``[min(n_queries, n)]`` distinct indices in [0, n), fixed by ``seed``
  (numpy PCG64), so pictures from different runs show the same queries."""
  if n_queries < 0 or n < 0:
    raise ValueError(f"choose_queries needs n_queries, n >= 0, got {n_queries}, {n}")
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(n, size=min(n_queries, n), replace=False)).astype(np.int64)


def retrieve(
  query_emb: np.ndarray,
  gallery_emb: np.ndarray,
  query_labels: np.ndarray,
  gallery_labels: np.ndarray,
  *,
  k: int,
  self_index: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray]:
  """Top-k gallery neighbours by cosine similarity (NumPy, for small picture sets).

  Args:
    query_emb ``[Q, D]``, gallery_emb ``[G, D]`` float; labels int ``[Q]``, ``[G]``.
    k: neighbours per query.
    self_index: optional int ``[Q]``, each query's own gallery index, excluded
      (leave-one-out protocols, where the gallery is the query set).

  Returns:
    ``(topk int64 [Q, min(k, G)], correct bool [Q, min(k, G)])``; ties broken by index.
  """
  qe = np.asarray(query_emb, np.float64)
  ge = np.asarray(gallery_emb, np.float64)
  qe = qe / np.maximum(np.linalg.norm(qe, axis=1, keepdims=True), 1e-12)
  ge = ge / np.maximum(np.linalg.norm(ge, axis=1, keepdims=True), 1e-12)
  sim = qe @ ge.T
  if self_index is not None:
    sim[np.arange(sim.shape[0]), np.asarray(self_index)] = -np.inf
  kk = min(int(k), sim.shape[1] - (self_index is not None))
  topk = np.argsort(-sim, axis=1, kind="stable")[:, :kk]
  correct = np.asarray(gallery_labels)[topk] == np.asarray(query_labels)[:, None]
  return topk.astype(np.int64), correct


def _umask() -> int:
  mask = os.umask(0)  # reading the umask means setting it: put it straight back
  os.umask(mask)
  return mask


def save_png(path: str, img: np.ndarray) -> None:
  """Writes uint8 ``[H, W]`` / ``[H, W, 3]`` / ``[H, W, 4]`` as PNG atomically (temp file
  in the same folder, then rename), so a reader never sees half a file."""
  from PIL import Image

  img = np.asarray(img)
  if img.dtype != np.uint8 or img.ndim not in (2, 3):
    raise ValueError(f"save_png needs a uint8 [H, W(, C)] image, got {img.dtype} {img.shape}")
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=".png.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      Image.fromarray(img.squeeze(-1) if img.ndim == 3 and img.shape[-1] == 1 else img).save(
        f, format="PNG"
      )
    # mkstemp makes 0600 files; a picture gets the mode of any new file (0644).
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
