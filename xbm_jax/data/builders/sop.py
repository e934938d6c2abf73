"""Stanford Online Products (Song et al., CVPR 2016).

Layout: `Stanford_Online_Products/Ebay_train.txt`, `Ebay_test.txt` (a header
line `image_id class_id super_class_id path`, then one image per line) and the
images at the listed paths (e.g. `bicycle_final/111085122871_0.JPG`).
Splits: train (11,318 classes, 59,551 images), test (11,316 / 60,502).
`label` = class_id (1-based, disjoint between train and test).
"""

from __future__ import annotations

import os

from xbm_jax.data.builders import common

NAME = "sop"
SPLITS = ("train", "test")
FOLDERS = ("Stanford_Online_Products",)
DESCRIPTION = (
  "Stanford Online Products; label = official class_id; index = line order of Ebay_<split>.txt."
)
_HEADER = ["image_id", "class_id", "super_class_id", "path"]


def _read(root: str, list_name: str) -> list[common.Entry]:
  path = os.path.join(root, list_name)
  common.require_file(path)
  with open(path, encoding="utf-8") as f:
    header = f.readline().split()
  if [h.lower() for h in header] != _HEADER:
    raise common.ListFileError(
      f"{path}:1: expected header {' '.join(_HEADER)}, got {' '.join(header)!r}"
    )
  out = []
  for lineno, line in common.read_lines(path, skip=1):
    _, cls, _, rel = common.fields(path, lineno, line, 4, names=" ".join(_HEADER))
    out.append(
      common.Entry(os.path.join(root, rel), common.to_int(cls, path, lineno, "class_id"), rel)
    )
  return out


def entries(manual_dir: str) -> dict[str, list[common.Entry]]:
  root = common.find_root(manual_dir, "Ebay_train.txt", FOLDERS)
  return {"train": _read(root, "Ebay_train.txt"), "test": _read(root, "Ebay_test.txt")}
