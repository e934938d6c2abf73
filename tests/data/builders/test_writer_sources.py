"""writer.write_dataset and sources: round trips, corrupt images, errors, atomicity."""

import io
import os
import pickle
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import fakes
from xbm_jax.data import builders, sources
from xbm_jax.data import dataset_writer as writer
from xbm_jax.data.builders import listfile


def _rng_images(n, h=5, w=7, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), np.uint8)


def test_png_round_trip_through_tfds_without_tensorflow(tmp_path):
  images = _rng_images(6)
  labels = [3, 3, 8, 1, 8, 8]
  res = writer.write_dataset(
    "toy",
    str(tmp_path),
    {"train": [(im, l, None) for im, l in zip(images, labels)]},
    progress=False,
  )
  assert res.path == str(tmp_path / "toy" / writer.DEFAULT_VERSION)
  src = sources.load("toy", "train", str(tmp_path))
  np.testing.assert_array_equal(src.labels, labels)
  assert src.num_classes == 3
  np.testing.assert_array_equal(src.contiguous_labels, [1, 1, 2, 0, 2, 2])
  for i in range(6):
    np.testing.assert_array_equal(src[i]["image"], images[i])  # PNG: exact
  batch = src.__getitems__([4, 0])
  assert [r["index"] for r in batch] == [4, 0]
  # tfds' own entry point reads the same records.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  ds = tfds.data_source("toy", split="train", data_dir=str(tmp_path))  # by name
  np.testing.assert_array_equal(ds[2]["image"], images[2])
  assert "tensorflow" not in sys.modules


def test_order_kept_across_shards(tmp_path):
  """labels-<split>.npy is collected while writing: records must keep input order."""
  images = _rng_images(9, h=2, w=2, seed=3)
  labels = [7, 1, 4, 4, 0, 9, 2, 2, 5]
  writer.write_dataset(
    "toy",
    str(tmp_path),
    {"train": [(im, l, f"f{i}") for i, (im, l) in enumerate(zip(images, labels))]},
    num_shards=3,
    progress=False,
  )
  path = tmp_path / "toy" / writer.DEFAULT_VERSION
  assert len(list(path.glob("toy-train.array_record-*"))) == 3
  src = sources.load("toy", "train", str(tmp_path))
  np.testing.assert_array_equal(src.labels, labels)
  for i in range(9):
    np.testing.assert_array_equal(src[i]["image"], images[i])
    assert (src[i]["label"], src[i]["index"]) == (labels[i], i)
  with pytest.raises(ValueError, match="lower snake case"):
    writer.write_dataset("My-Data", str(tmp_path), {"train": []})
  with pytest.raises(TypeError, match="f1: label must be an integer"):
    writer.write_dataset(
      "bad",
      str(tmp_path),
      {"train": [(images[0], 1, "f0"), (images[1], 1.5, "f1")]},
      progress=False,
    )


def test_source_pickles_and_feeds_grain(tmp_path):
  import grain  # pylint: disable=g-import-not-at-top

  images = _rng_images(5, seed=1)
  writer.write_dataset(
    "toy", str(tmp_path), {"train": [(im, i, None) for i, im in enumerate(images)]}, progress=False
  )
  src = sources.load("toy", "train", str(tmp_path))
  src[0]  # opens the tfds source; pickling must drop it
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone[3]["image"], images[3])
  ds = grain.MapDataset.source(src).map(lambda r: r["label"] * 10)
  assert list(ds) == [0, 10, 20, 30, 40]


def test_non_rgb_images_decode_to_three_channels(tmp_path):
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
  cmyk = io.BytesIO()
  Image.new("CMYK", (4, 3), (10, 20, 30, 40)).save(cmyk, format="JPEG")
  pal = io.BytesIO()
  Image.fromarray(_rng_images(1)[0]).convert("P").save(pal, format="PNG")
  items = [(grey, 0, "grey"), (cmyk.getvalue(), 1, "cmyk"), (pal.getvalue(), 2, "pal")]
  writer.write_dataset("mixed", str(tmp_path), {"train": items}, progress=False)
  src = sources.load("mixed", "train", str(tmp_path))
  np.testing.assert_array_equal(src[0]["image"], np.repeat(grey[..., None], 3, -1))
  want = np.asarray(Image.open(cmyk).convert("RGB"))
  np.testing.assert_array_equal(src[1]["image"], want)
  assert src[2]["image"].shape == (5, 7, 3)


def _corrupt_sop(tmp_path):
  manual = str(tmp_path / "manual")
  fakes.sop(manual)
  root = os.path.join(manual, "Stanford_Online_Products")
  bad = os.path.join(root, "bicycle_final/2_1.JPG")
  with open(bad, "rb") as f:
    data = f.read()
  with open(bad, "wb") as f:
    f.write(data[: len(data) // 2])  # truncated JPEG
  os.remove(os.path.join(root, "bicycle_final/5_0.JPG"))  # missing file
  return manual, bad


def test_corrupt_images_skipped_with_count(tmp_path):
  manual, bad = _corrupt_sop(tmp_path)
  res = builders.prepare(
    "sop", manual_dir=manual, data_dir=str(tmp_path / "d"), on_corrupt="skip", progress=False
  )
  assert res.num_examples == {"train": 5, "test": 3}
  assert res.skipped["train"] == [bad]
  assert res.skipped["test"][0].endswith("bicycle_final/5_0.JPG")
  src = sources.load("sop", "train", str(tmp_path / "d"))
  np.testing.assert_array_equal(src.labels, [1, 1, 2, 3, 3])
  assert [src[i]["index"] for i in range(5)] == list(range(5))


def test_corrupt_image_fails_naming_path_and_leaves_nothing(tmp_path):
  manual, bad = _corrupt_sop(tmp_path)
  with pytest.raises(writer.CorruptImageError, match="2_1.JPG"):
    builders.prepare("sop", manual_dir=manual, data_dir=str(tmp_path / "d"), progress=False)
  assert os.listdir(tmp_path / "d" / "sop") == []  # no version, no tmp left
  with pytest.raises(FileNotFoundError, match="no prepared dataset 'sop'"):
    sources.load("sop", "train", str(tmp_path / "d"))


def test_failure_midway_keeps_previous_version_and_no_partial(tmp_path):
  good = [(im, 1, None) for im in _rng_images(3)]
  writer.write_dataset("toy", str(tmp_path), {"train": good}, progress=False)

  def exploding():
    yield from good
    raise RuntimeError("disk on fire")

  with pytest.raises(FileExistsError):
    writer.write_dataset("toy", str(tmp_path), {"train": good}, progress=False)
  with pytest.raises(RuntimeError, match="disk on fire"):
    writer.write_dataset(
      "toy", str(tmp_path), {"train": exploding()}, overwrite=True, progress=False
    )
  assert os.listdir(tmp_path / "toy") == [writer.DEFAULT_VERSION]
  assert len(sources.load("toy", "train", str(tmp_path))) == 3
  with pytest.raises(RuntimeError, match="disk on fire"):
    writer.write_dataset("other", str(tmp_path), {"train": exploding()}, progress=False)
  assert os.listdir(tmp_path / "other") == []


@pytest.mark.parametrize(
  "edit, match",
  [
    (("Ebay_train.txt", 3, "3 2 1\n"), r"Ebay_train.txt:3: expected 4 fields"),
    (
      ("Ebay_test.txt", 2, "9 x 1 a.jpg\n"),
      r"Ebay_test.txt:2: class_id must be an integer, got 'x'",
    ),
    (("Ebay_train.txt", 1, "id class path\n"), r"Ebay_train.txt:1: expected header"),
  ],
)
def test_malformed_sop_list_names_file_and_line(tmp_path, edit, match):
  fakes.sop(str(tmp_path))
  name, lineno, text = edit
  path = tmp_path / "Stanford_Online_Products" / name
  lines = path.read_text().splitlines(keepends=True)
  lines[lineno - 1] = text
  path.write_text("".join(lines))
  with pytest.raises(builders.ListFileError, match=match):
    builders.entries("sop", str(tmp_path))


def test_missing_and_malformed_files_other_layouts(tmp_path):
  fakes.cub(str(tmp_path / "cub"))
  os.remove(tmp_path / "cub" / "CUB_200_2011" / "image_class_labels.txt")
  with pytest.raises(builders.ListFileError, match="missing list file .*image_class_labels.txt"):
    builders.entries("cub", str(tmp_path / "cub"))
  fakes.inshop(str(tmp_path / "shop"))
  lst = next(tmp_path.glob("shop/*/Eval/list_eval_partition.txt"))
  lines = lst.read_text().splitlines()
  lst.write_text("\n".join(lines[:5] + [lines[5].replace("query", "probe")] + lines[6:]) + "\n")
  with pytest.raises(builders.ListFileError, match=r"list_eval_partition.txt:6: evaluation_status"):
    builders.entries("inshop", str(tmp_path / "shop"))
  lst.write_text("\n".join(["99"] + lines[1:]) + "\n")
  with pytest.raises(builders.ListFileError, match=r"txt:1: header says 99"):
    builders.entries("inshop", str(tmp_path / "shop"))
  with pytest.raises(builders.ListFileError, match="cannot find Ebay_train.txt"):
    builders.entries("sop", str(tmp_path / "cub"))


def test_listfile_and_folder_datasets(tmp_path):
  pix = {}
  for i, (rel, label) in enumerate([("a/x.png", 4), ("a/y,1.png", 4), ("b/z.png", 9)]):
    pix[rel] = fakes.image(str(tmp_path / "lists" / "imgs" / rel), seed=i, fmt="PNG")
  fakes.write(
    str(tmp_path / "lists" / "train.txt"), "imgs/a/x.png,4\nimgs/a/y,1.png,4\n\nimgs/b/z.png,9\n"
  )
  builders.prepare(
    "listfile",
    name="mine",
    manual_dir=str(tmp_path / "lists"),
    data_dir=str(tmp_path / "d"),
    progress=False,
  )
  src = sources.load("mine", "train", str(tmp_path / "d"))
  np.testing.assert_array_equal(src.labels, [4, 4, 9])
  np.testing.assert_array_equal(src[1]["image"], pix["a/y,1.png"])
  fakes.write(str(tmp_path / "lists" / "train.txt"), "imgs/a/x.png,4\nbad line\n")
  with pytest.raises(builders.ListFileError, match=r"train.txt:2: expected 2"):
    builders.entries("listfile", str(tmp_path / "lists"))
  # Class-per-folder: names shared across splits keep one label.
  for split, cls in (("train", "cat"), ("train", "dog"), ("test", "eel"), ("test", "cat")):
    fakes.image(str(tmp_path / "tree" / split / cls / "0.jpg"), seed=1)
  got = builders.entries("listfile", str(tmp_path / "tree"))
  assert {s: [e.label for e in v] for s, v in got.items()} == {"test": [0, 2], "train": [0, 1]}


def test_load_errors_name_path_and_splits(tmp_path):
  writer.write_dataset(
    "toy",
    str(tmp_path),
    {"train": [(_rng_images(1)[0], 0, None)], "query": [(_rng_images(1)[0], 0, None)]},
    progress=False,
  )
  with pytest.raises(FileNotFoundError, match=r"no split 'test' .*\['query', 'train'\]"):
    sources.load("toy", "test", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"'cub' at .*cub .*\['toy'\]"):
    sources.load("cub", "train", str(tmp_path))


def test_array_source():
  images = _rng_images(4, h=2, w=3)
  src = sources.ArraySource(images, np.array([5, 2, 5, 7], np.int32))
  assert len(src) == 4 and src.num_classes == 3 and src.labels.dtype == np.int64
  rec = src[2]
  assert rec["label"] == 5 and rec["index"] == 2
  np.testing.assert_array_equal(rec["image"], images[2])
  np.testing.assert_array_equal(src.contiguous_labels, [1, 0, 1, 2])
  with pytest.raises(IndexError):
    src[4]
  with pytest.raises(ValueError, match="uint8"):
    sources.ArraySource(images.astype(np.float32), np.zeros(4, int))
  with pytest.raises(ValueError, match="4 images but 3 labels"):
    sources.ArraySource(images, np.zeros(3, int))


def test_listfile_splits_are_taken_by_name_not_every_txt(tmp_path):
  """A README.txt or classes.txt beside train.txt/test.txt used to become a split
  (and fail to parse, or worse, parse)."""
  lists = tmp_path / "lists"
  fakes.image(str(lists / "imgs" / "x.png"), seed=0, fmt="PNG")
  for split in ("train", "test", "val"):
    fakes.write(str(lists / f"{split}.txt"), "imgs/x.png,1\n")
  fakes.write(str(lists / "classes.txt"), "imgs/x.png,1\n")  # parses, but no split
  fakes.write(str(lists / "README.txt"), "my data set\n")
  chosen, ignored = listfile.split_files(str(lists))
  assert sorted(chosen) == ["test", "train", "val"]
  assert ignored == ["README.txt", "classes.txt"]
  assert sorted(builders.entries("listfile", str(lists))) == ["test", "train", "val"]
  got = builders.entries("listfile", str(lists), splits=["train", "test"])
  assert sorted(got) == ["test", "train"]
  with pytest.raises(builders.ListFileError, match=r"split\(s\) \['tset'\].*tset.txt"):
    builders.entries("listfile", str(lists), splits=["train", "tset"])
