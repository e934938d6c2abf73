"""CUB-200-2011 (Wah et al., 2011).

Layout: `CUB_200_2011/images.txt` (`image_id relative_path`),
`image_class_labels.txt` (`image_id class_id`), `images/<relative_path>`.
DML protocol: classes 1-100 train (5,864 images), 101-200 test (5,924).
`label` = class_id (1..200).
"""

from __future__ import annotations

import os

from xbm_jax.data.builders import common

NAME = "cub"
SPLITS = ("train", "test")
FOLDERS = ("CUB_200_2011",)
NUM_TRAIN_CLASSES = 100
DESCRIPTION = (
  "CUB-200-2011; label = official class_id 1..200; train = "
  "classes 1-100, test = 101-200; order of images.txt."
)


def entries(manual_dir: str) -> dict[str, list[common.Entry]]:
  root = common.find_root(manual_dir, "images.txt", FOLDERS)
  images_txt = os.path.join(root, "images.txt")
  labels_txt = os.path.join(root, "image_class_labels.txt")
  labels = {}
  for lineno, line in common.read_lines(labels_txt):
    image_id, cls = common.fields(labels_txt, lineno, line, 2, names="image_id class_id")
    labels[image_id] = common.to_int(cls, labels_txt, lineno, "class_id")
  out = {"train": [], "test": []}
  for lineno, line in common.read_lines(images_txt):
    image_id, rel = common.fields(images_txt, lineno, line, 2, names="image_id path")
    if image_id not in labels:
      raise common.ListFileError(
        f"{images_txt}:{lineno}: image_id {image_id} has no line in {labels_txt}"
      )
    cls = labels[image_id]
    if not 1 <= cls <= 2 * NUM_TRAIN_CLASSES:
      raise common.ListFileError(
        f"{labels_txt}: image_id {image_id} has class_id {cls}, outside 1..200"
      )
    split = "train" if cls <= NUM_TRAIN_CLASSES else "test"
    out[split].append(common.Entry(os.path.join(root, "images", rel), cls, "images/" + rel))
  return out
