"""Custom datasets: list files (`relative/path.jpg,label`) or class-per-folder trees.

List files (the reference code's format): one image per line,
`relative/path.jpg,label`, no header; the path is relative to `image_root`
(default: the list file's folder); the last comma separates the label. With
`entries(manual_dir, splits)`, `<split>.txt` for each named split; without names,
the `.txt` files named like a split (`train`, `test`, `val`, `query`, `gallery`,
optionally with a suffix such as `test_800`), so a `README.txt` or `classes.txt`
beside them is never taken for a split.

Class-per-folder: `<split>/<class>/<...>/image.jpg`. The label is the class
folder name when every class name (over all splits) is an integer, else the
class's rank in the sorted union of names over all splits (so a class keeps
its label across splits).
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Sequence

from xbm_jax.data.builders import common

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
DESCRIPTION = "Custom dataset from {kind}; label = {label}."
SPLIT_NAME = re.compile(r"^(train|test|val|valid|validation|dev|query|gallery)([_-]\w+)?$")


def list_entries(
  lists: Mapping[str, str], image_root: str | None = None
) -> dict[str, list[common.Entry]]:
  """Reads `path,label` list files, one per split."""
  out = {}
  for split, path in lists.items():
    base = image_root or os.path.dirname(os.path.abspath(path))
    rows = []
    for lineno, line in common.read_lines(path):
      rel, label = common.fields(path, lineno, line, 2, sep=",", names="relative/path.jpg,label")
      rows.append(
        common.Entry(os.path.join(base, rel), common.to_int(label, path, lineno, "label"), rel)
      )
    out[split] = rows
  return out


def _images_under(folder: str) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames.sort()
    found += [
      os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)
    ]
  return found


def folder_entries(dirs: Mapping[str, str]) -> dict[str, list[common.Entry]]:
  """Reads class-per-folder trees, one root folder per split."""
  classes = {}
  for split, root in dirs.items():
    if not os.path.isdir(root):
      raise common.ListFileError(f"split {split!r}: {root} is not a directory")
    classes[split] = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes[split]:
      raise common.ListFileError(f"split {split!r}: {root} has no class folders")
  names = sorted({c for cs in classes.values() for c in cs})
  numeric = all(c.isdigit() for c in names)
  label_of = {c: int(c) if numeric else i for i, c in enumerate(names)}
  out = {}
  for split, root in dirs.items():
    rows = []
    for c in classes[split]:
      for p in _images_under(os.path.join(root, c)):
        rows.append(common.Entry(p, label_of[c], os.path.relpath(p, root)))
    out[split] = rows
  return out


def split_files(
  manual_dir: str, splits: Optional[Sequence[str]] = None
) -> tuple[dict[str, str], list[str]]:
  """`({split: list file}, [other .txt files, not read])` in manual_dir.

  `splits`: the split names to read (each `<split>.txt` must exist); None: the
  `.txt` files whose name matches SPLIT_NAME.
  """
  if not os.path.isdir(manual_dir):
    raise common.ListFileError(f"manual_dir {manual_dir} is not a directory")
  txt = sorted(
    n[:-4]
    for n in os.listdir(manual_dir)
    if n.endswith(".txt") and os.path.isfile(os.path.join(manual_dir, n))
  )
  if splits and not set(splits) & set(txt):  # class-per-folder splits, no list files
    return {}, [t + ".txt" for t in txt]
  if splits:
    missing = [s for s in splits if s not in txt]
    if missing:
      raise common.ListFileError(
        f"{manual_dir}: no list file for split(s) {missing} "
        f"(expected {', '.join(m + '.txt' for m in missing)}); "
        f"found: {[t + '.txt' for t in txt]}"
      )
    chosen = list(splits)
  else:
    chosen = [t for t in txt if SPLIT_NAME.match(t)]
  lists = {s: os.path.join(manual_dir, s + ".txt") for s in chosen}
  return lists, [t + ".txt" for t in txt if t not in lists]


def entries(
  manual_dir: str, splits: Optional[Sequence[str]] = None
) -> dict[str, list[common.Entry]]:
  """`<split>.txt` list files in manual_dir if any (see `split_files`), else
  `<split>/<class>/` folders (the named `splits`, or every folder)."""
  lists, _ = split_files(manual_dir, splits)
  if lists:
    return list_entries(lists)
  names = sorted(os.listdir(manual_dir))
  dirs = {
    n: os.path.join(manual_dir, n)
    for n in names
    if not n.startswith(".")
    and os.path.isdir(os.path.join(manual_dir, n))
    and (not splits or n in splits)
  }
  if not dirs:
    raise common.ListFileError(
      f"{manual_dir}: no <split>.txt list files and no <split>/<class>/ folders"
    )
  return folder_entries(dirs)
