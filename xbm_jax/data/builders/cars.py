"""Stanford Cars / Cars196 (Krause et al., 3dRR 2013).

Layout: `cars_annos.mat` (MATLAB struct array `annotations` with fields
`relative_im_path` (`car_ims/000001.jpg`), `class` (1..196), `test`, bbox_*)
beside `car_ims/`. Read with scipy.io.loadmat (scipy is needed for this
dataset only). DML protocol: classes 1-98 train (8,054 images), 99-196 test
(8,131); the `test` flag of the classification split is ignored.
`label` = class (1..196).
"""

from __future__ import annotations

import os

import numpy as np

from xbm_jax.data.builders import common

# Stored as "cars": tfds registers its own "cars196" builder, and
# tfds.data_source("cars196", ...) would pick that one instead of our files.
NAME = "cars"
SPLITS = ("train", "test")
FOLDERS = ("cars196", "CARS196", "stanford_cars", "StanfordCars")
NUM_TRAIN_CLASSES = 98
DESCRIPTION = (
  "Cars196; label = official class 1..196; train = classes 1-98, "
  "test = 99-196; order of cars_annos.mat."
)


def _scalar(value):
  """A MATLAB cell/field value (possibly nested 0-d/1-element arrays) as a scalar."""
  while isinstance(value, np.ndarray):
    if value.size != 1:
      raise ValueError(f"expected one value, got shape {value.shape}")
    value = value.reshape(-1)[0]
  return value


def entries(manual_dir: str) -> dict[str, list[common.Entry]]:
  root = common.find_root(manual_dir, "cars_annos.mat", FOLDERS)
  path = os.path.join(root, "cars_annos.mat")
  try:
    import scipy.io  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading cars_annos.mat needs scipy (pip install scipy==1.17.1)") from e
  try:
    mat = scipy.io.loadmat(path)
  except Exception as e:  # scipy raises ValueError / MatReadError / OSError
    raise common.ListFileError(f"{path}: not a readable MATLAB file ({e})") from e
  ann = mat.get("annotations")
  if (
    ann is None
    or ann.dtype.names is None
    or not {"relative_im_path", "class"} <= set(ann.dtype.names)
  ):
    raise common.ListFileError(
      f"{path}: expected a struct array 'annotations' with fields relative_im_path and class"
    )
  out = {"train": [], "test": []}
  for i, a in enumerate(ann.reshape(-1)):
    try:
      rel = str(_scalar(a["relative_im_path"]))
      cls = int(_scalar(a["class"]))
    except (ValueError, TypeError) as e:
      raise common.ListFileError(f"{path}: annotations[{i}] is malformed ({e})") from e
    if not 1 <= cls <= 2 * NUM_TRAIN_CLASSES:
      raise common.ListFileError(
        f"{path}: annotations[{i}] ({rel}) has class {cls}, outside 1..196"
      )
    split = "train" if cls <= NUM_TRAIN_CLASSES else "test"
    out[split].append(common.Entry(os.path.join(root, rel), cls, rel))
  return out
