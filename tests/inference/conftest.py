"""A tiny trained run shared by the inference tests (one 6-step training, ~20 s on CPU).

The test split is written twice: into the prepared (tfds) dataset the run evaluates on,
and as PNG files (lossless) with a list file, so a file embeds as its record must.
"""

import os

import numpy as np
import pytest
from PIL import Image

from xbm_jax.data import dataset_writer as data_writer


def blobs(rng, classes, per, size=(20, 24)):
  for c in classes:
    base = rng.integers(0, 256, size=size + (3,))
    for _ in range(per):
      yield np.clip(base + rng.normal(0, 30, size=base.shape), 0, 255).astype(np.uint8), int(c)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """`dict(workdir, data_dir, list_file, images: [(path, uint8 [H, W, 3], label)])`."""
  from tests.helpers.runs import tiny_config  # pylint: disable=g-import-not-at-top
  from xbm_jax.train import loop  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp("tiny_run")
  rng = np.random.default_rng(0)
  train = list(blobs(rng, range(12), 6))
  test = list(blobs(rng, range(100, 106), 5))
  data_dir = str(root / "tfds")
  splits = {"train": [(im, l, None) for im, l in train], "test": [(im, l, None) for im, l in test]}
  data_writer.write_dataset("tiny", data_dir, splits, progress=False)
  images, lines = [], []
  for i, (im, label) in enumerate(test):
    rel = f"imgs/test_{i:03d}.png"
    os.makedirs(root / "files" / "imgs", exist_ok=True)
    Image.fromarray(im).save(root / "files" / rel)
    images.append((str(root / "files" / rel), im, label))
    lines.append(f"{rel},{label}\n")
  (root / "files" / "test.txt").write_text("".join(lines))
  cfg = tiny_config(data_dir, **{"pictures.enabled": False, "drift.enabled": False})
  workdir = str(root / "run")
  loop.train_and_evaluate(cfg, workdir)
  return dict(
    workdir=workdir, data_dir=data_dir, list_file=str(root / "files" / "test.txt"), images=images
  )
