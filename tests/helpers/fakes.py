"""Tiny fake archives in each official layout (a few classes, 8x6 JPEGs).

Every maker returns the expected content, `{split: [(relative_name, label)]}`
in list order, written independently of the builders under test.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def image(path: str, seed: int, fmt: str = "JPEG", size=(8, 6)) -> np.ndarray:
  """Writes a small random RGB image; returns its pixels uint8 [H, W, 3]."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, format=fmt)
  return pixels


def write(path: str, text: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return path


def sop(manual_dir: str) -> dict:
  root = os.path.join(manual_dir, "Stanford_Online_Products")
  expect = {"train": [], "test": []}
  image_id = 0
  for split, classes in (("train", [1, 2, 3]), ("test", [4, 5])):
    lines = ["image_id class_id super_class_id path"]
    for c in classes:
      for k in range(2):
        image_id += 1
        rel = f"bicycle_final/{c}_{k}.JPG"
        image(os.path.join(root, rel), seed=image_id)
        lines.append(f"{image_id} {c} 1 {rel}")
        expect[split].append((rel, c))
    write(os.path.join(root, f"Ebay_{split}.txt"), "\n".join(lines) + "\n")
  return expect


def cub(manual_dir: str, classes=(1, 2, 100, 101, 150, 200)) -> dict:
  root = os.path.join(manual_dir, "CUB_200_2011")
  images, labels = [], []
  expect = {"train": [], "test": []}
  image_id = 0
  for c in classes:
    for k in range(2):
      image_id += 1
      rel = f"{c:03d}.Bird_{c}/Bird_{c}_{k}.jpg"
      image(os.path.join(root, "images", rel), seed=100 + image_id)
      images.append(f"{image_id} {rel}")
      labels.append(f"{image_id} {c}")
      expect["train" if c <= 100 else "test"].append(("images/" + rel, c))
  write(os.path.join(root, "images.txt"), "\n".join(images) + "\n")
  write(os.path.join(root, "image_class_labels.txt"), "\n".join(labels) + "\n")
  return expect


def cars(manual_dir: str, classes=(1, 98, 99, 196, 5)) -> dict:
  import scipy.io  # pylint: disable=g-import-not-at-top

  root = manual_dir  # the official archive extracts car_ims/ + cars_annos.mat
  rows = []
  expect = {"train": [], "test": []}
  for i, c in enumerate(classes):
    rel = f"car_ims/{i + 1:06d}.jpg"
    image(os.path.join(root, rel), seed=200 + i)
    rows.append((rel, c, i % 2))
    expect["train" if c <= 98 else "test"].append((rel, c))
  ann = np.zeros(
    (1, len(rows)),
    dtype=[("relative_im_path", "O"), ("bbox_x1", "O"), ("class", "O"), ("test", "O")],
  )
  for i, (rel, c, t) in enumerate(rows):
    ann[0, i] = (
      rel,
      np.array([[3]], np.uint8),
      np.array([[c]], np.uint8),
      np.array([[t]], np.uint8),
    )
  scipy.io.savemat(
    os.path.join(root, "cars_annos.mat"),
    {"annotations": ann, "class_names": np.array([["a"] * 196], dtype=object)},
  )
  return expect


def inshop(manual_dir: str) -> dict:
  """The official nesting: <bench>/Eval/list_eval_partition.txt, <bench>/Img/img/."""
  bench = os.path.join(manual_dir, "In-shop Clothes Retrieval Benchmark")
  plan = [
    (1, "train"),
    (1, "train"),
    (2, "train"),
    (7, "query"),
    (7, "gallery"),
    (7, "gallery"),
    (9, "query"),
    (9, "gallery"),
  ]
  expect = {"train": [], "query": [], "gallery": []}
  lines = [str(len(plan)), "image_name item_id evaluation_status"]
  for i, (item, status) in enumerate(plan):
    rel = f"img/WOMEN/Dresses/id_{item:08d}/{i:02d}_1_front.jpg"
    image(os.path.join(bench, "Img", rel), seed=300 + i)
    lines.append(f"{rel}  id_{item:08d}  {status}")
    expect[status].append((rel, item))
  write(os.path.join(bench, "Eval", "list_eval_partition.txt"), "\n".join(lines) + "\n")
  return expect


def vehicleid(manual_dir: str) -> dict:
  root = os.path.join(manual_dir, "VehicleID_V1.0")
  plan = {
    "train": [(10, 2), (11, 3)],
    "test_800": [(20, 2)],
    "test_1600": [(20, 2), (21, 2)],
    "test_2400": [(20, 2), (21, 2), (22, 3)],
  }
  lists = {
    "train": "train_list.txt",
    "test_800": "test_list_800.txt",
    "test_1600": "test_list_1600.txt",
    "test_2400": "test_list_2400.txt",
  }
  expect = {}
  for split, ids in plan.items():
    lines, expect[split] = [], []
    for vid, n in ids:
      for k in range(n):
        name = f"{vid:08d}{k}"
        path = os.path.join(root, "image", name + ".jpg")
        if not os.path.exists(path):
          image(path, seed=vid * 10 + k)
        lines.append(f"{name} {vid}")
        expect[split].append((f"image/{name}.jpg", vid))
    write(os.path.join(root, "train_test_split", lists[split]), "\n".join(lines) + "\n")
  return expect


def listfile(manual_dir: str, classes: dict) -> dict:
  """`train.txt` / `test.txt` list files over PNGs in `imgs/`; `classes` maps each
  split to `{label: number of images}`. Returns `{split: [(relative_name, label)]}`."""
  expect = {}
  for split, sizes in classes.items():
    rows = []
    for label, n in sizes.items():
      for i in range(n):
        rel = f"imgs/{split}_{label}_{i}.png"
        image(os.path.join(manual_dir, rel), seed=1000 * label + i, fmt="PNG", size=(12, 10))
        rows.append((rel, label))
    write(os.path.join(manual_dir, f"{split}.txt"), "".join(f"{r},{l}\n" for r, l in rows))
    expect[split] = rows
  return expect
