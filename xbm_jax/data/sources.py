"""Random-access image sources (grain `RandomAccessDataSource` protocol).

    src = sources.load("sop", "train", data_dir)   # prepared by scripts/prepare_data.py
    src.labels        # int64 [N], loaded from labels-train.npy, no image decoded
    src[i]            # {"image": uint8 [H, W, 3], "label": int, "index": i}

`label` is the dataset's official class id (SOP class_id, CUB class 1..200,
Cars196 class 1..196 (stored as "cars"), In-shop item id number, VehicleID
vehicle id), so labels compare across splits (In-shop query vs gallery). `contiguous_labels` gives 0-based ranks
within one split for code that needs them (not comparable across splits).
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import numpy as np

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
# Cars196 is stored as "cars" (tfds registers a different "cars196" builder).
ALIASES = {"cars196": "cars"}


def _contiguous(labels: np.ndarray) -> np.ndarray:
  return np.unique(labels, return_inverse=True)[1].astype(np.int64).reshape(-1)


class ArraySource:
  """A source over in-memory arrays (embedded glyphs, tests).

  Args:
    images: uint8 [N, H, W, C].
    labels: integer [N].
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be integer [N], got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self.images = images
    self.labels = labels.astype(np.int64)
    self.num_classes = int(len(np.unique(self.labels)))

  @property
  def contiguous_labels(self) -> np.ndarray:
    """int64 [N]: labels renumbered 0..num_classes-1 in sorted order."""
    return _contiguous(self.labels)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    i = int(index)
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} records")
    i %= len(self)
    return {"image": self.images[i], "label": int(self.labels[i]), "index": i}

  def __repr__(self) -> str:
    return (
      f"ArraySource(n={len(self)}, image={self.images.shape[1:]}, num_classes={self.num_classes})"
    )


class TfdsSource:
  """A split of a dataset written by `xbm_jax.data.dataset_writer`, read through tfds.

  Reads go through `tfds.builder_from_directory(path).as_data_source(split)`
  (array_record + PIL/OpenCV decoding; no TensorFlow). The tfds source is
  opened lazily and dropped on pickling, so grain worker processes reopen it.

  Attributes:
    path: the dataset version directory.
    split: split name.
    labels: int64 [N], record order.
    num_classes: number of distinct labels in this split.
  """

  def __init__(self, path: str, split: str, labels: np.ndarray):
    self.path = path
    self.split = split
    self.labels = np.asarray(labels, np.int64)
    self.num_classes = int(len(np.unique(self.labels)))
    self._source = None

  @property
  def contiguous_labels(self) -> np.ndarray:
    """int64 [N]: labels renumbered 0..num_classes-1 within this split."""
    return _contiguous(self.labels)

  def _tfds(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

      self._source = tfds.builder_from_directory(self.path).as_data_source(split=self.split)
      if len(self._source) != len(self.labels):
        raise ValueError(
          f"{self.path}: split {self.split!r} has {len(self._source)} "
          f"records but labels-{self.split}.npy has {len(self.labels)}"
        )
    return self._source

  @staticmethod
  def _record(ex: dict[str, Any]) -> dict[str, Any]:
    return {"image": ex["image"], "label": int(ex["label"]), "index": int(ex["index"])}

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._record(self._tfds()[int(index)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    """Batched read (grain uses it when present)."""
    exs = self._tfds().__getitems__([int(i) for i in indices])
    return [self._record(ex) for ex in exs]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __repr__(self) -> str:
    return (
      f"TfdsSource({self.path!r}, split={self.split!r}, n={len(self)}, "
      f"num_classes={self.num_classes})"
    )


Source = ArraySource | TfdsSource


def _versions(ds_dir: str) -> list[str]:
  """Finished version directories (tmp/incomplete ones are skipped), oldest first."""
  out = []
  for v in os.listdir(ds_dir):
    if _VERSION_RE.match(v) and os.path.isfile(os.path.join(ds_dir, v, "dataset_info.json")):
      out.append(v)
  return sorted(out, key=lambda v: tuple(int(p) for p in v.split(".")))


def dataset_path(name: str, data_dir: str, version: str | None = None) -> str:
  """Returns `data_dir/name/<version>` (newest finished one by default).

  Raises:
    FileNotFoundError: naming the path looked at and what exists there.
  """
  ds_dir = os.path.join(data_dir, name)
  versions = _versions(ds_dir) if os.path.isdir(ds_dir) else []
  if not versions:
    have = (
      sorted(d for d in os.listdir(data_dir) if not d.startswith("."))
      if os.path.isdir(data_dir)
      else []
    )
    raise FileNotFoundError(
      f"no prepared dataset {name!r} at {ds_dir} (datasets in {data_dir}: "
      f"{have or 'none'}); run scripts/prepare_data.py --dataset ... "
      f"--data_dir {data_dir}"
    )
  if version is None:
    return os.path.join(ds_dir, versions[-1])
  if version not in versions:
    raise FileNotFoundError(f"no version {version} of {name!r} at {ds_dir} (versions: {versions})")
  return os.path.join(ds_dir, version)


def splits(name: str, data_dir: str, version: str | None = None) -> list[str]:
  """The split names of a prepared dataset."""
  path = dataset_path(name, data_dir, version)
  return sorted(
    f[len("labels-") : -len(".npy")]
    for f in os.listdir(path)
    if f.startswith("labels-") and f.endswith(".npy")
  )


def load(name: str, split: str, data_dir: str, version: str | None = None) -> TfdsSource:
  """Opens `split` of the prepared dataset `data_dir/name/<version>`.

  Args:
    name: dataset name as prepared ("sop", "cub", "cars" (alias "cars196"),
      "inshop", "vehicleid", or a custom list-file / folder dataset).
    split: e.g. "train", "test", "query", "gallery", "test_800".
    data_dir: root folder given to scripts/prepare_data.py.
    version: a version string; the newest finished one by default.

  Raises:
    FileNotFoundError: the dataset or split is missing (names the path and the
      splits that exist).
  """
  name = ALIASES.get(name, name)
  path = dataset_path(name, data_dir, version)
  labels_file = os.path.join(path, f"labels-{split}.npy")
  if not os.path.isfile(labels_file):
    raise FileNotFoundError(
      f"no split {split!r} in {path} (no {os.path.basename(labels_file)}); "
      f"splits: {splits(name, data_dir, version)}"
    )
  labels = np.load(labels_file)
  if labels.ndim != 1 or labels.dtype != np.int64:
    raise ValueError(f"{labels_file}: expected int64 [N], got {labels.dtype} {labels.shape}")
  return TfdsSource(path, split, labels)
