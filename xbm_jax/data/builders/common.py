"""Shared pieces of the dataset builders: entries, list-file parsing, roots.

A builder turns an official layout under a manual directory into
`{split: [Entry, ...]}`; `xbm_jax.data.builders.prepare` hands those to
`xbm_jax.data.dataset_writer.write_dataset`. Every parsing error is a `ListFileError`
that names the file and the 1-based line.
"""

from __future__ import annotations

import os
from typing import Iterator, NamedTuple, Sequence


class Entry(NamedTuple):
  """One image of a split.

  Attributes:
    path: absolute path of the image file.
    label: the official class id (int).
    name: the path as written in the official list (stored as `path`).
  """

  path: str
  label: int
  name: str


class ListFileError(ValueError):
  """A missing or malformed list / annotation file (names the file and line)."""


def require_file(path: str, what: str = "list file") -> str:
  if not os.path.isfile(path):
    parent = os.path.dirname(path) or "."
    have = sorted(os.listdir(parent))[:20] if os.path.isdir(parent) else None
    raise ListFileError(
      f"missing {what} {path}"
      + (f" ({parent} holds {have})" if have is not None else f" (no directory {parent})")
    )
  return path


def read_lines(path: str, *, skip: int = 0) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, stripped line) of non-empty lines after `skip`."""
  require_file(path)
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if lineno <= skip:
        continue
      line = line.strip()
      if line:
        yield lineno, line


def fields(
  path: str, lineno: int, line: str, n: int, sep: str | None = None, names: str = ""
) -> list[str]:
  """Splits a line into exactly `n` fields or raises naming file and line."""
  parts = line.split(sep) if sep is None else line.rsplit(sep, n - 1)
  parts = [p.strip() for p in parts]
  if len(parts) != n or not all(parts):
    raise ListFileError(
      f"{path}:{lineno}: expected {n} fields{' (' + names + ')' if names else ''}, got {line!r}"
    )
  return parts


def to_int(token: str, path: str, lineno: int, what: str) -> int:
  try:
    return int(token)
  except ValueError:
    raise ListFileError(f"{path}:{lineno}: {what} must be an integer, got {token!r}") from None


def find_root(manual_dir: str, marker: str, folders: Sequence[str]) -> str:
  """The directory holding `marker`: manual_dir itself or manual_dir/<folder>.

  Args:
    manual_dir: where the user put the extracted archive.
    marker: a file or folder relative to the dataset root (e.g. "Ebay_train.txt").
    folders: the official top-level folder names of the extracted archive.

  Raises:
    ListFileError: naming every place looked at.
  """
  if not os.path.isdir(manual_dir):
    raise ListFileError(f"manual_dir {manual_dir} is not a directory")
  candidates = [manual_dir] + [os.path.join(manual_dir, f) for f in folders]
  for root in candidates:
    if os.path.exists(os.path.join(root, marker)):
      return root
  looked = ", ".join(os.path.join(c, marker) for c in candidates)
  raise ListFileError(
    f"cannot find {marker} (looked at {looked}); extract the official archive into {manual_dir}"
  )


ARCHIVE_SUFFIXES = (".zip", ".tgz", ".tar.gz", ".tar")


def _stem(name: str) -> str:
  for suffix in ARCHIVE_SUFFIXES:
    if name.lower().endswith(suffix):
      return name[: -len(suffix)]
  return name


def archives(manual_dir: str) -> list[str]:
  """Top-level archives of manual_dir not yet extracted beside themselves.

  `CUB_200_2011.tgz` counts as extracted when `CUB_200_2011/` exists next to
  it (the official archives unpack to a folder named like the archive).
  """
  if not os.path.isdir(manual_dir):
    return []
  names = set(os.listdir(manual_dir))
  return sorted(
    os.path.join(manual_dir, n)
    for n in names
    if n.lower().endswith(ARCHIVE_SUFFIXES) and _stem(n) not in names
  )


def extract_overlay(manual_dir: str, out_dir: str) -> str:
  """Extracts manual_dir's unextracted archives into out_dir, links the rest.

  The result looks like manual_dir with its archives extracted in place (Cars:
  car_ims.tgz extracted beside a linked cars_annos.mat). Archives nested deeper
  (In-shop's Img/img.zip) must be extracted by hand.
  """
  import tarfile  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top

  found = archives(manual_dir)
  for name in os.listdir(manual_dir):
    src = os.path.join(manual_dir, name)
    if src not in found:
      os.symlink(os.path.abspath(src), os.path.join(out_dir, name))
  for path in found:
    try:
      if path.lower().endswith(".zip"):
        with zipfile.ZipFile(path) as z:
          z.extractall(out_dir)  # zipfile drops absolute and ".." parts
      else:
        with tarfile.open(path) as t:
          t.extractall(out_dir, filter="data")  # refuses paths outside out_dir
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
      raise ListFileError(f"cannot extract archive {path}: {e}") from e
  return out_dir
