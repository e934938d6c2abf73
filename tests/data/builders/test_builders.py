"""Official layouts -> prepared tfds datasets -> sources.load, end to end.

The oracle is the fake archive itself (fakes.py): its list of (name, label) per
split, and the pixels PIL decodes from each original file.
"""

import os

import numpy as np
import pytest
from PIL import Image

from tests.helpers import fakes
from xbm_jax.data import builders, sources

MAKERS = {
  "sop": fakes.sop,
  "cub": fakes.cub,
  "cars": fakes.cars,
  "inshop": fakes.inshop,
  "vehicleid": fakes.vehicleid,
}


_PREPARED = {}


def _prepare(name, tmp_path_factory):
  """Makes the fake archive of `name` and prepares it, once per session."""
  if name not in _PREPARED:
    manual = str(tmp_path_factory.mktemp(f"{name}_manual"))
    data_dir = str(tmp_path_factory.mktemp(f"{name}_data"))
    expect = MAKERS[name](manual)
    result = builders.prepare(name, manual_dir=manual, data_dir=data_dir, progress=False)
    _PREPARED[name] = name, manual, data_dir, expect, result
  return _PREPARED[name]


@pytest.fixture(params=sorted(MAKERS))
def prepared(request, tmp_path_factory):
  return _prepare(request.param, tmp_path_factory)


def _original(manual, name, rel):
  for dirpath, _, files in os.walk(manual):
    p = os.path.join(dirpath, os.path.basename(rel))
    if os.path.basename(rel) in files and p.endswith(rel):
      return np.asarray(Image.open(p).convert("RGB"))
  raise AssertionError(f"{rel} not in the fake archive of {name}")


def test_splits_sizes_labels_and_pixels(prepared):
  name, manual, data_dir, expect, result = prepared
  assert sorted(sources.splits(name, data_dir)) == sorted(expect)
  assert sorted(builders.BUILDERS[name].SPLITS) == sorted(expect)
  for split, rows in expect.items():
    src = sources.load(name, split, data_dir)
    assert len(src) == len(rows) == result.num_examples[split]
    want = np.array([label for _, label in rows], np.int64)
    np.testing.assert_array_equal(src.labels, want)
    assert src.labels.dtype == np.int64
    assert src.num_classes == len(set(want.tolist()))
    for i, (rel, label) in enumerate(rows):
      rec = src[i]
      assert set(rec) == {"image", "label", "index"}
      assert rec["label"] == label and rec["index"] == i
      assert rec["image"].dtype == np.uint8
      # Same JPEG decoder (PIL) on both sides; OpenCV, if installed, may differ by 1.
      orig = _original(manual, name, rel)
      assert rec["image"].shape == orig.shape
      assert np.abs(rec["image"].astype(int) - orig).max() <= 1


def test_class_splits_are_disjoint_and_official(prepared):
  name, _, data_dir, _, _ = prepared
  labels = {
    s: set(sources.load(name, s, data_dir).labels.tolist()) for s in sources.splits(name, data_dir)
  }
  if name == "cub":
    assert labels == {"train": {1, 2, 100}, "test": {101, 150, 200}}
  elif name == "cars":
    assert labels == {"train": {1, 5, 98}, "test": {99, 196}}
  elif name == "inshop":
    # Query and gallery share items (the retrieval protocol); train is apart.
    assert labels["query"] == labels["gallery"] == {7, 9}
    assert labels["train"] == {1, 2}
  elif name == "sop":
    assert labels == {"train": {1, 2, 3}, "test": {4, 5}}
  elif name == "vehicleid":
    assert labels["train"] == {10, 11}
    assert labels["test_800"] < labels["test_1600"] < labels["test_2400"]


def test_inshop_partition_counts(tmp_path_factory):
  name, _, data_dir, _, _ = _prepare("inshop", tmp_path_factory)
  sizes = {s: len(sources.load(name, s, data_dir)) for s in ("train", "query", "gallery")}
  assert sizes == {"train": 3, "query": 2, "gallery": 3}


def test_vehicleid_test_sets_grow(tmp_path_factory):
  name, _, data_dir, _, _ = _prepare("vehicleid", tmp_path_factory)
  n = [sources.load(name, s, data_dir).num_classes for s in ("test_800", "test_1600", "test_2400")]
  assert n == [1, 2, 3]


def test_sop_flat_manual_dir(tmp_path):
  """The manual dir may be the extracted folder itself."""
  expect = fakes.sop(str(tmp_path / "m"))
  got = builders.entries("sop", str(tmp_path / "m" / "Stanford_Online_Products"))
  assert {s: [(e.name, e.label) for e in v] for s, v in got.items()} == expect


def test_archives_in_manual_dir_are_extracted(tmp_path):
  """CUB_200_2011.tgz alone; Cars: car_ims.tgz beside cars_annos.mat."""
  import shutil  # pylint: disable=g-import-not-at-top
  import tarfile  # pylint: disable=g-import-not-at-top

  src, manual, data = tmp_path / "src", tmp_path / "manual", str(tmp_path / "d")
  expect = fakes.cub(str(src))
  manual.mkdir()
  with tarfile.open(manual / "CUB_200_2011.tgz", "w:gz") as t:
    t.add(src / "CUB_200_2011", arcname="CUB_200_2011")
  builders.prepare("cub", manual_dir=str(manual), data_dir=data, progress=False)
  np.testing.assert_array_equal(
    sources.load("cub", "test", data).labels, [label for _, label in expect["test"]]
  )
  cars_src, cars_manual = tmp_path / "cars_src", tmp_path / "cars_manual"
  expect = fakes.cars(str(cars_src))
  cars_manual.mkdir()
  shutil.copy(cars_src / "cars_annos.mat", cars_manual)
  with tarfile.open(cars_manual / "car_ims.tgz", "w:gz") as t:
    t.add(cars_src / "car_ims", arcname="car_ims")
  builders.prepare("cars196", manual_dir=str(cars_manual), data_dir=data, progress=False)
  src_ = sources.load("cars196", "train", data)
  np.testing.assert_array_equal(src_.labels, [l for _, l in expect["train"]])
  assert src_[0]["image"].shape == (6, 8, 3)
  assert sorted(os.listdir(data)) == ["cars", "cub"]  # scratch removed; alias
