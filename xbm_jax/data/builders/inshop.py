"""DeepFashion In-shop Clothes Retrieval (Liu et al., CVPR 2016).

Layout: `list_eval_partition.txt` (line 1: image count; line 2: the column
names `image_name item_id evaluation_status`; then one image per line, status
train / query / gallery), at the dataset root or in `Eval/`, and the images at
`<base>/<image_name>` (`image_name` starts with `img/`; `<base>` is the list's
folder, its parent, or `Img/` beside it, as the official zip extracts).
Splits: train (3,997 items / 25,882 images), query (14,218), gallery (12,612).
`label` = the item id number (`id_00000123` -> 123), shared by query and gallery.
"""

from __future__ import annotations

import os

from xbm_jax.data.builders import common

NAME = "inshop"
SPLITS = ("train", "query", "gallery")
FOLDERS = ("In-shop Clothes Retrieval Benchmark", "InShop", "inshop", "In-shop", "Eval")
DESCRIPTION = (
  "DeepFashion In-shop; label = item id number (id_00000123 -> "
  "123), comparable between query and gallery; index = line order."
)
_COLUMNS = ["image_name", "item_id", "evaluation_status"]


def _item_label(token: str, path: str, lineno: int) -> int:
  if not token.startswith("id_"):
    raise common.ListFileError(
      f"{path}:{lineno}: item_id must look like id_00000123, got {token!r}"
    )
  return common.to_int(token[3:], path, lineno, "item_id number")


def _image_base(list_dir: str, first_image: str, path: str) -> str:
  parent = os.path.dirname(list_dir)
  candidates = [list_dir, os.path.join(list_dir, "Img"), parent, os.path.join(parent, "Img")]
  for base in candidates:
    if os.path.isfile(os.path.join(base, first_image)):
      return base
  raise common.ListFileError(
    f"{path}: cannot find its first image {first_image} under any of "
    f"{candidates}; extract img.zip beside the list file"
  )


def entries(manual_dir: str) -> dict[str, list[common.Entry]]:
  try:
    root = common.find_root(manual_dir, "list_eval_partition.txt", FOLDERS)
    path = os.path.join(root, "list_eval_partition.txt")
  except common.ListFileError:
    root = common.find_root(manual_dir, "Eval/list_eval_partition.txt", FOLDERS)
    path = os.path.join(root, "Eval", "list_eval_partition.txt")
  lines = list(common.read_lines(path))
  if len(lines) < 2:
    raise common.ListFileError(f"{path}: expected a count line and a column line before the images")
  (n_line, count), (c_line, columns) = lines[:2]
  count = common.to_int(count, path, n_line, "image count")
  if columns.split() != _COLUMNS:
    raise common.ListFileError(
      f"{path}:{c_line}: expected columns {' '.join(_COLUMNS)}, got {columns!r}"
    )
  rows = lines[2:]
  if len(rows) != count:
    raise common.ListFileError(
      f"{path}:{n_line}: header says {count} images, the file lists {len(rows)}"
    )
  out = {s: [] for s in SPLITS}
  base = None
  for lineno, line in rows:
    rel, item, status = common.fields(path, lineno, line, 3, names=" ".join(_COLUMNS))
    if status not in out:
      raise common.ListFileError(
        f"{path}:{lineno}: evaluation_status must be one of {SPLITS}, got {status!r}"
      )
    base = base or _image_base(os.path.dirname(path), rel, path)
    out[status].append(common.Entry(os.path.join(base, rel), _item_label(item, path, lineno), rel))
  return out
