r"""Prepare a benchmark dataset as a tfds array_record dataset (offline, no TF).

    python scripts/prepare_data.py --dataset sop \
        --manual_dir /data/manual --data_dir /data/tfds [--on_corrupt skip]

--manual_dir holds the extracted official archive (e.g.
/data/manual/Stanford_Online_Products/Ebay_train.txt, or the folder itself).
Datasets: sop, cub, cars (alias cars196), inshop, vehicleid, listfile
(`<split>.txt` files of `relative/path.jpg,label`, or `<split>/<class>/`
folders; needs --name).
Read back with `xbm_jax.data.sources.load(name, split, data_dir)`.
"""
import sys

from absl import app, flags, logging

from xbm_jax.data import builders, writer

_DATASET = flags.DEFINE_enum("dataset", None,
                             list(builders.DATASETS) + list(builders.ALIASES),
                             "Which dataset layout to read.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None,
                                  "Folder holding the extracted archive.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Output root folder.")
_NAME = flags.DEFINE_string("name", None, "Stored name (default: --dataset).")
_ON_CORRUPT = flags.DEFINE_enum("on_corrupt", "fail", ["fail", "skip"],
                                "What to do with a corrupt or missing image.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace an existing prepared version.")
flags.mark_flags_as_required(["dataset", "manual_dir", "data_dir"])


def main(argv):
  del argv
  try:
    result = builders.prepare(_DATASET.value, manual_dir=_MANUAL_DIR.value,
                              data_dir=_DATA_DIR.value, name=_NAME.value,
                              on_corrupt=_ON_CORRUPT.value,
                              overwrite=_OVERWRITE.value)
  except (builders.ListFileError, writer.CorruptImageError,
          FileExistsError) as e:  # user errors: the message says it all
    sys.exit(f"prepare_data: {type(e).__name__}: {e}")
  for split, n in result.num_examples.items():
    skipped = result.skipped[split]
    logging.info("%s: %d images%s", split, n,
                 f", {len(skipped)} corrupt skipped" if skipped else "")
  print(f"prepared {result.path}: {result.num_examples}; skipped "
        f"{ {s: len(v) for s, v in result.skipped.items()} }")


if __name__ == "__main__":
  app.run(main)
