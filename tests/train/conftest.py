"""Fixtures shared by the trainer tests."""

import numpy as np
import pytest

from xbm_jax.data import dataset_writer as data_writer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """12 train classes x 6 images, 6 test classes x 5, 20x20 RGB blobs per class."""
  root = str(tmp_path_factory.mktemp("tfds"))
  rng = np.random.default_rng(0)

  def split(classes, per):
    for c in classes:
      base = rng.integers(0, 256, size=(20, 20, 3))
      for _ in range(per):
        img = np.clip(base + rng.normal(0, 30, size=base.shape), 0, 255).astype(np.uint8)
        yield img, int(c), None

  data_writer.write_dataset(
    "tiny",
    root,
    {"train": list(split(range(12), 6)), "test": list(split(range(100, 106), 5))},
    progress=False,
  )
  return root
