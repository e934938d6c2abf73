"""Custom datasets: list files (`relative/path.jpg,label`) or class-per-folder trees.

List files (the reference code's format): one image per line,
`relative/path.jpg,label`, no header; the path is relative to `image_root`
(default: the list file's folder); the last comma separates the label. With
`entries(manual_dir)`, every `<split>.txt` in manual_dir is a split.

Class-per-folder: `<split>/<class>/<...>/image.jpg`. The label is the class
folder name when every class name (over all splits) is an integer, else the
class's rank in the sorted union of names over all splits (so a class keeps
its label across splits).
"""
from __future__ import annotations

import os
from typing import Mapping

from xbm_jax.data.builders import common

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
DESCRIPTION = "Custom dataset from {kind}; label = {label}."


def list_entries(lists: Mapping[str, str], image_root: str | None = None
                 ) -> dict[str, list[common.Entry]]:
  """Reads `path,label` list files, one per split."""
  out = {}
  for split, path in lists.items():
    base = image_root or os.path.dirname(os.path.abspath(path))
    rows = []
    for lineno, line in common.read_lines(path):
      rel, label = common.fields(path, lineno, line, 2, sep=",",
                                 names="relative/path.jpg,label")
      rows.append(common.Entry(os.path.join(base, rel),
                               common.to_int(label, path, lineno, "label"), rel))
    out[split] = rows
  return out


def _images_under(folder: str) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in os.walk(folder):
    dirnames.sort()
    found += [os.path.join(dirpath, f) for f in sorted(filenames)
              if f.lower().endswith(IMAGE_EXTENSIONS)]
  return found


def folder_entries(dirs: Mapping[str, str]) -> dict[str, list[common.Entry]]:
  """Reads class-per-folder trees, one root folder per split."""
  classes = {}
  for split, root in dirs.items():
    if not os.path.isdir(root):
      raise common.ListFileError(f"split {split!r}: {root} is not a directory")
    classes[split] = sorted(d for d in os.listdir(root)
                            if os.path.isdir(os.path.join(root, d)))
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


def entries(manual_dir: str) -> dict[str, list[common.Entry]]:
  """`<split>.txt` list files in manual_dir if any, else `<split>/<class>/` folders."""
  if not os.path.isdir(manual_dir):
    raise common.ListFileError(f"manual_dir {manual_dir} is not a directory")
  names = sorted(os.listdir(manual_dir))
  lists = {n[:-4]: os.path.join(manual_dir, n) for n in names
           if n.endswith(".txt") and os.path.isfile(os.path.join(manual_dir, n))}
  if lists:
    return list_entries(lists)
  dirs = {n: os.path.join(manual_dir, n) for n in names if not n.startswith(".")
          and os.path.isdir(os.path.join(manual_dir, n))}
  if not dirs:
    raise common.ListFileError(f"{manual_dir}: no <split>.txt list files and no "
                               "<split>/<class>/ folders")
  return folder_entries(dirs)
