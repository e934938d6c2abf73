"""What a checkpoint must survive besides a kill: a file damaged after it was
written, and a write that fails (no space, read-only, quota).

Orbax finalises a checkpoint by renaming its temporary folder, so a checkpoint
folder is complete when written; it keeps no checksums of the array data, though (a
garbled byte in a zstd block reads back as other numbers). So after each save the
size and CRC-32 of every file are recorded in `DIGEST_FILE` beside orbax's files
(read back from disk: the save's own verification), and a restore first compares
them. A checkpoint without the file (older, or the process died between orbax's
rename and this write) is complete and is read unverified.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import zlib
from typing import Optional

DIGEST_FILE = "xbm_files.json"
DAMAGED_DIR = "damaged"  # beside last/ and best/: orbax never looks there
_CHUNK = 1 << 22
# TensorStore reports an OS error in its message only: "... [os_error_code='28']".
_OS_CODE = re.compile(r"os_error_code='(\d+)'")


def _crc(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names if n != DIGEST_FILE]
  return sorted(out)


def write_digest(step_dir: str) -> None:
  """Records each file's size and CRC-32, atomically (a temporary file renamed)."""
  digest = {}
  for rel in _files(step_dir):
    path = os.path.join(step_dir, rel)
    digest[rel] = [os.path.getsize(path), _crc(path)]
  out = os.path.join(step_dir, DIGEST_FILE)
  try:
    with open(out + ".tmp", "w") as f:
      json.dump(digest, f)
    os.replace(out + ".tmp", out)
  finally:
    if os.path.exists(out + ".tmp"):
      os.remove(out + ".tmp")


def check_digest(step_dir: str) -> str:
  """What differs from the recorded files ("" when all match or none were recorded)."""
  path = os.path.join(step_dir, DIGEST_FILE)
  if not os.path.exists(path):
    return ""
  try:
    with open(path) as f:
      digest = json.load(f)
  except (OSError, ValueError) as e:
    return f"{DIGEST_FILE} unreadable ({e})"
  for rel, (size, crc) in sorted(digest.items()):
    file = os.path.join(step_dir, rel)
    if not os.path.isfile(file):
      return f"{rel} is missing"
    if os.path.getsize(file) != size:
      return f"{rel} is {os.path.getsize(file)} bytes, {size} were written"
    if _crc(file) != crc:
      return f"{rel} differs from what was written (CRC-32)"
  return ""


def move_aside(step_dir: str) -> str:
  """Moves a damaged checkpoint folder to `checkpoints/damaged/<name>` (never
  deletes it); returns the new path."""
  root = os.path.join(os.path.dirname(os.path.dirname(step_dir)), DAMAGED_DIR)
  os.makedirs(root, exist_ok=True)
  name = os.path.basename(os.path.dirname(step_dir)) + "-" + os.path.basename(step_dir)
  dest = os.path.join(root, name)
  if os.path.exists(dest):  # damaged again after an earlier one of that step
    dest += time.strftime("-%Y%m%d-%H%M%S")
  os.replace(step_dir, dest)
  return dest


def write_failure(e: BaseException) -> Optional[str]:
  """The OS error behind a failed write, as "No space left on device (errno 28)",
  or None when `e` is no OS error (a bug, kept with its traceback)."""
  for err in (e, e.__cause__, e.__context__):
    if isinstance(err, OSError) and err.errno:
      return f"{os.strerror(err.errno)} (errno {err.errno})"
    match = _OS_CODE.search(str(err)) if err is not None else None
    if match:
      code = int(match.group(1))
      return f"{os.strerror(code)} (errno {code})"
  return None


def newest_intact(last_dir: str) -> Optional[int]:
  """The newest step in `last_dir` whose folder is finalised and matches its
  recorded files; None if none."""
  if not os.path.isdir(last_dir):
    return None
  for step in sorted((int(d) for d in os.listdir(last_dir) if d.isdigit()), reverse=True):
    if not check_digest(os.path.join(last_dir, str(step))):
      return step
  return None


def resume_hint(workdir: str) -> str:
  """Where a run stopped by a failed write resumes, for its one-line message."""
  step = newest_intact(os.path.join(workdir, "checkpoints", "last")) if workdir else None
  if step is None:
    return "no checkpoint was saved yet: free space (or make it writable) and run it again"
  return (
    f"the newest intact checkpoint is step {step}; free space (or make it writable) "
    "and run the same command to resume from it"
  )


def first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


class _DropThreadErrors(logging.Filter):
  """Orbax logs a failed write of its worker threads with a traceback before the same
  error reaches the caller of `save`, which reports it once."""

  def filter(self, record):
    return "raised an exception" not in record.getMessage()


@contextlib.contextmanager
def orbax_thread_errors_dropped():
  logger, drop = logging.getLogger("absl"), _DropThreadErrors()
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)
