"""Image sources for embedding: a folder, a list file, or a prepared (tfds) split.

Each is a random-access source as `pipeline.eval_batches` reads them
(`len`, `[i] -> {"image", "label", "index"}`), plus `paths` (`[N]` str, "" where a
record has none) and `labelled` (False for a plain folder: its labels are -1).

Image files are decoded here to uint8 `[H, W, 3]` with PIL, as tfds decodes the
JPEG/PNG bytes `xbm_jax.data.dataset_writer` keeps, so a file embeds exactly as the same file
prepared into a split and evaluated. A file that cannot be decoded raises `DataError`
naming it.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from xbm_jax.data.builders import common, listfile
from xbm_jax.train.errors import DataError


def read_image(path: str, channels: int = 3) -> np.ndarray:
  """uint8 `[H, W, 3]` RGB (or `[H, W, 1]` gray for a grayscale model) of an image file;
  DataError naming the file if unreadable."""
  try:
    with Image.open(path) as img:
      if channels == 1:
        return np.asarray(img.convert("L"), dtype=np.uint8)[..., None]
      return np.asarray(img.convert("RGB"), dtype=np.uint8)
  except UnidentifiedImageError:  # its own message repeats the path
    raise DataError(f"unreadable image {path}: not an image file PIL can decode") from None
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f"unreadable image {path}: {str(e).splitlines()[0] if str(e) else e!r}")


class FileSource:
  """Image files with labels (-1 when unlabelled); `paths` as the user named them.

  Args:
    files: absolute (or cwd-relative) paths to read.
    labels: int `[N]`, or None (unlabelled: every label -1).
    names: how each file is reported (`paths`); default the files themselves.
    channels: 3 (RGB) or 1 (gray), the model's input (`Embedder.channels`).
  """

  def __init__(self, files: Sequence[str], labels=None, names=None, *, channels: int = 3):
    if not files:
      raise DataError("no images to embed (the folder or list file is empty)")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:  # before any work: the first missing file, named
      raise DataError(f"unreadable image {missing[0]}: no such file ({len(missing)} missing)")
    self.files, self.channels = list(files), int(channels)
    self.labelled = labels is not None
    self.labels = np.asarray(labels if labels is not None else [-1] * len(files), np.int64)
    self.paths = np.asarray(list(names) if names is not None else self.files, dtype=str)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    i = int(index)
    return {
      "image": read_image(self.files[i], self.channels),
      "label": int(self.labels[i]),
      "index": i,
    }


def folder(root: str, *, channels: int = 3) -> FileSource:
  """Every image under `root` (sorted walk, as `listfile`), unlabelled; paths relative
  to `root`."""
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise DataError(f"--images {root} is not a directory")
  files = listfile._images_under(root)  # pylint: disable=protected-access
  if not files:
    raise DataError(f"{root} holds no images ({', '.join(listfile.IMAGE_EXTENSIONS)})")
  return FileSource(files, None, [os.path.relpath(f, root) for f in files], channels=channels)


def list_file(path: str, image_root: str | None = None, *, channels: int = 3) -> FileSource:
  """A `relative/path.jpg,label` list file (the format prepare_data.py reads)."""
  path = os.path.expanduser(path)
  try:
    rows = listfile.list_entries({"list": path}, image_root)["list"]
  except common.ListFileError as e:
    raise DataError(str(e)) from e
  if not rows:
    raise DataError(f"list file {path} has no images")
  files, labels, names = [r.path for r in rows], [r.label for r in rows], [r.name for r in rows]
  return FileSource(files, labels, names, channels=channels)


class SplitSource:
  """A prepared split (`xbm_jax.data.sources.TfdsSource` or glyphs) with empty paths."""

  labelled = True

  def __init__(self, source):
    self.source = source
    self.labels = np.asarray(source.labels, np.int64)
    self.paths = np.full((len(source),), "", dtype=str)

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    rec = self.source[int(index)]
    return {"image": rec["image"], "label": int(rec["label"]), "index": int(index)}

  def __getitems__(self, indices):
    many = getattr(self.source, "__getitems__", None)
    recs = many(list(indices)) if many else [self.source[int(i)] for i in indices]
    return [
      {"image": r["image"], "label": int(r["label"]), "index": int(i)}
      for r, i in zip(recs, indices)
    ]
