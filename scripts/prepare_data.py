r"""Prepare a benchmark dataset as a tfds array_record dataset (offline, no TF).

    python scripts/prepare_data.py --dataset sop \
        --manual_dir /data/manual --data_dir /data/tfds [--on_corrupt skip]

--manual_dir holds the extracted official archive (e.g.
/data/manual/Stanford_Online_Products/Ebay_train.txt, or the folder itself).
Datasets: sop, cub, cars (alias cars196), inshop, vehicleid, listfile
(`<split>.txt` files of `relative/path.jpg,label`, or `<split>/<class>/`
folders; needs --name; `--splits train,test` names the splits, default: the files
named like splits, so a README.txt beside them is not a split).
A mistake in the inputs (a missing or malformed list file, a corrupt or missing
image, an unwritable --data_dir) prints one line, `error: ...`, and exits with
status 2; `--verbose` shows the traceback and tfds's INFO logs.
Read back with `xbm_jax.data.sources.load(name, split, data_dir)`.
"""

import logging as py_logging
import os
import sys

from absl import app, flags, logging

from xbm_jax.train.cli_checks import AboveTheBarHandler, DropNoise

from xbm_jax.data import builders
from xbm_jax.data import dataset_writer as writer
from xbm_jax.data.builders import listfile

_DATASET = flags.DEFINE_enum(
  "dataset", None, list(builders.DATASETS) + list(builders.ALIASES), "Which dataset layout to read."
)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder holding the extracted archive.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Output root folder.")
_NAME = flags.DEFINE_string("name", None, "Stored name (default: --dataset).")
_ON_CORRUPT = flags.DEFINE_enum(
  "on_corrupt", "fail", ["fail", "skip"], "What to do with a corrupt or missing image."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing prepared version.")
_SPLITS = flags.DEFINE_list(
  "splits",
  None,
  "listfile: the splits to read, e.g. train,test (default: the <split>.txt named like splits).",
)
_VERBOSE = flags.DEFINE_bool(
  "verbose", False, "Tracebacks for input errors, and the INFO logs of tfds/absl."
)
flags.mark_flags_as_required(["dataset", "manual_dir", "data_dir"])
USER_ERRORS = (
  builders.ListFileError,
  writer.CorruptImageError,
  OSError,  # FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError
  ValueError,
)
USER_ERROR_STATUS = 2


def quiet_logs() -> None:
  """Warnings only (e.g. each image `--on_corrupt skip` leaves out), as whole lines
  above the progress bars; tfds's INFO lines about its scratch folders go."""
  root = py_logging.getLogger()
  for handler in list(root.handlers):
    root.removeHandler(handler)
  handler = AboveTheBarHandler()
  handler.setFormatter(py_logging.Formatter("%(levelname)s: %(message)s"))
  root.addHandler(handler)
  root.setLevel(py_logging.WARNING)
  logging.set_verbosity(logging.WARNING)
  py_logging.getLogger("absl").addFilter(DropNoise())


def error_line(e: BaseException) -> str:
  """The one line a failed prepare ends with."""
  if isinstance(e, writer.CorruptImageError):
    return f"{e}; pass --on_corrupt skip to leave such images out"
  return str(e)


def say_list_files(manual_dir: str) -> None:
  """Which list files a listfile dataset reads, and which it leaves alone."""
  lists, ignored = listfile.split_files(manual_dir, _SPLITS.value)
  if lists:
    print(
      "reading "
      + ", ".join(f"{s} <- {os.path.basename(p)}" for s, p in lists.items())
      + (f"; ignoring {', '.join(ignored)}" if ignored else "")
    )


def main(argv):
  del argv
  if not _VERBOSE.value:
    quiet_logs()
  manual_dir = os.path.expandvars(os.path.expanduser(_MANUAL_DIR.value))
  data_dir = os.path.expandvars(os.path.expanduser(_DATA_DIR.value))
  try:
    if builders.ALIASES.get(_DATASET.value, _DATASET.value) == builders.CUSTOM:
      say_list_files(manual_dir)
    result = builders.prepare(
      _DATASET.value,
      manual_dir=manual_dir,
      data_dir=data_dir,
      name=_NAME.value,
      on_corrupt=_ON_CORRUPT.value,
      overwrite=_OVERWRITE.value,
      splits=_SPLITS.value,
    )
  except USER_ERRORS as e:  # the message says it all; --verbose for the traceback
    if _VERBOSE.value:
      raise
    sys.stdout.flush()
    print(f"error: {error_line(e)}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_STATUS)
  for split, n in result.num_examples.items():
    skipped = result.skipped[split]
    logging.info(
      "%s: %d images%s", split, n, f", {len(skipped)} corrupt skipped" if skipped else ""
    )
  print(
    f"prepared {result.path}: {result.num_examples}; skipped "
    f"{ {s: len(v) for s, v in result.skipped.items()} }"
  )


if __name__ == "__main__":
  app.run(main)
