"""Dataset builders: official layouts in a manual directory -> tfds array_record.

    from xbm_jax.data import builders
    result = builders.prepare("sop", manual_dir="/data/manual", data_dir="/data/tfds")

Each builder module has `NAME`, `SPLITS`, `DESCRIPTION` and
`entries(manual_dir) -> {split: [common.Entry]}`; `prepare` checks the splits
and writes them with `xbm_jax.data.dataset_writer.write_dataset`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from xbm_jax.data.builders import cars, common, cub, inshop, listfile, sop, vehicleid

BUILDERS = {m.NAME: m for m in (sop, cub, cars, inshop, vehicleid)}
CUSTOM = "listfile"  # `<split>.txt` list files or `<split>/<class>/` folders
DATASETS = tuple(BUILDERS) + (CUSTOM,)
ALIASES = {"cars196": "cars"}  # accepted on input; stored under the value

Entry = common.Entry
ListFileError = common.ListFileError


def entries(dataset: str, manual_dir: str, splits=None) -> dict[str, list[common.Entry]]:
  """The parsed splits of `dataset` under `manual_dir` (no image is read);
  `splits` names a listfile dataset's splits (see `listfile.split_files`)."""
  dataset = ALIASES.get(dataset, dataset)
  if dataset == CUSTOM:
    return listfile.entries(manual_dir, splits)
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; known: {DATASETS}")
  out = BUILDERS[dataset].entries(manual_dir)
  for split in BUILDERS[dataset].SPLITS:
    if not out.get(split):
      raise common.ListFileError(f"{dataset}: split {split!r} is empty in {manual_dir}")
  return out


def prepare(
  dataset: str,
  *,
  manual_dir: str,
  data_dir: str,
  name: str | None = None,
  on_corrupt: str = "fail",
  overwrite: bool = False,
  progress: bool = True,
  splits=None,
  **write_kwargs: Any,
):
  """Parses `dataset` in `manual_dir` and writes it to `data_dir/<name>/<version>`.

  Args:
    dataset: one of `DATASETS` ("sop", "cub", "cars", "inshop", "vehicleid",
      "listfile"); "cars196" is accepted for "cars".
    manual_dir: where the official archive was extracted (or where its
      archives lie: top-level .zip/.tgz/.tar.gz/.tar are extracted to a
      temporary folder in data_dir, removed afterwards).
    data_dir: root of prepared datasets (read back with `sources.load`).
    name: the stored name; defaults to `dataset` (required for "listfile").
    on_corrupt: "fail" or "skip" (see `writer.write_dataset`).
    overwrite: replace an existing prepared version.
    progress: tqdm bars.
    splits: listfile only: the split names to read (default: files named like splits).
    **write_kwargs: passed to `writer.write_dataset` (e.g. version).

  Returns:
    `writer.WriteResult`.
  """
  from xbm_jax.data import dataset_writer as writer

  dataset = ALIASES.get(dataset, dataset)
  if dataset == CUSTOM and not name:
    raise ValueError("a listfile dataset needs a name (--name)")
  name = name or dataset
  scratch = None
  try:
    if common.archives(manual_dir):
      # Official archives, not extracted: extract them into a scratch folder
      # in data_dir (deleted below) and read the extracted layout there.
      os.makedirs(data_dir, exist_ok=True)
      scratch = tempfile.mkdtemp(prefix=f".extract-{name}-", dir=data_dir)
      manual_dir = common.extract_overlay(manual_dir, scratch)
    if splits and dataset != CUSTOM:
      raise ValueError(f"splits are fixed for {dataset!r}; only listfile takes splits")
    splits = entries(dataset, manual_dir, splits)
    if dataset == CUSTOM:
      description = listfile.DESCRIPTION.format(
        kind=manual_dir, label="the given integer label / class folder"
      )
    else:
      description = BUILDERS[dataset].DESCRIPTION
    return writer.write_dataset(
      name,
      data_dir,
      {s: ((e.path, e.label, e.name) for e in rows) for s, rows in splits.items()},
      totals={s: len(rows) for s, rows in splits.items()},
      on_corrupt=on_corrupt,
      overwrite=overwrite,
      description=description,
      progress=progress,
      **write_kwargs,
    )
  finally:
    if scratch:
      shutil.rmtree(scratch, ignore_errors=True)
