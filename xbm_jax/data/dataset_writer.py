"""Write image datasets as tfds array_record datasets, without TensorFlow.

Layout written (readable by `tfds.builder_from_directory(...).as_data_source`):

    data_dir/<name>/<version>/
        dataset_info.json, features.json          tfds metadata
        <name>-<split>.array_record-0000x-of-0000y  records, in input order
        labels-<split>.npy                        int64 [N], record order
        prepare_report.json                       counts and skipped images

Each record has the tfds features
    image  Image(shape=(None, None, 3), uint8): encoded bytes, decoded on read
    label  Scalar int64: the label given to `write_dataset` (the official class id)
    index  Scalar int64: the record's position in its split, 0..N-1
    path   Text: where the image came from (for error reports and debugging)

How this avoids TensorFlow: tfds 4.9.10 only needs TF to *encode* numpy images
(`tf.image.encode_png`) and to read/write TFRecord. Encoded bytes pass through
`tfds.features.Image` untouched, the example serializer is pure Python, and
array_record reading decodes images with PIL/OpenCV. So images are encoded here
with PIL: JPEG/PNG bytes are kept as given; arrays and any other format or mode
(CMYK, palette, RGBA, 16-bit) are converted to RGB and stored as PNG.

Records are written in input order (`disable_shuffling`), so `labels-<split>.npy`
collected while writing matches the records without a decoding pass. tfds then
sorts all records of a split in one in-memory bucket; fine for these datasets
(a few GB at most), worth knowing for far larger ones.

Atomicity: everything is built under `data_dir/<name>/.tmp-*` and the finished
version directory is renamed into place last; readers ignore dot-directories.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Iterable, Mapping

import numpy as np

DEFAULT_VERSION = "1.0.0"
ON_CORRUPT = ("fail", "skip")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")  # what tfds accepts as a name
_KEEP_FORMATS = ("JPEG", "PNG")
_KEEP_MODES = ("RGB", "L")  # decoded to [H, W, 3] by tfds (grey is repeated)


class CorruptImageError(ValueError):
  """An image that is missing, unreadable or cannot be decoded; names its path."""


@dataclasses.dataclass
class WriteResult:
  """What `write_dataset` produced.

  Attributes:
    path: the finished version directory, `data_dir/name/version`.
    num_examples: split -> records written.
    skipped: split -> paths (or item descriptions) of skipped corrupt images.
  """

  path: str
  num_examples: dict[str, int]
  skipped: dict[str, list[str]]


def encode_image(image: Any, *, where: str = "<image>") -> bytes:
  """Returns image bytes that tfds decodes to uint8 [H, W, 3] without TF.

  Args:
    image: encoded bytes, a path (str / os.PathLike) to an image file, or a
      uint8 array [H, W], [H, W, 1] or [H, W, 3].
    where: how to name the image in errors (its path, or split and item).

  Raises:
    CorruptImageError: missing file or undecodable bytes (names `where`).
    ValueError / TypeError: a bad array shape or dtype, or an unsupported type.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"{where}: image dtype must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
      raise ValueError(
        f"{where}: image shape must be [H, W], [H, W, 1] or [H, W, 3], got {image.shape}"
      )
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
  if isinstance(image, (str, os.PathLike)):
    try:
      with open(image, "rb") as f:
        image = f.read()
    except OSError as e:
      raise CorruptImageError(f"{where}: cannot read image file ({e.strerror or e})") from e
  if not isinstance(image, (bytes, bytearray, memoryview)):
    raise TypeError(
      f"{where}: image must be bytes, a path or a uint8 array, got {type(image).__name__}"
    )
  data = bytes(image)
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # full decode: truncated JPEGs only fail here
      if im.format in _KEEP_FORMATS and im.mode in _KEEP_MODES:
        return data
      rgb = im.convert("RGB")
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...)
    detail = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))  # PIL's
    raise CorruptImageError(f"{where}: corrupt image ({type(e).__name__}: {detail})") from e
  buf = io.BytesIO()
  rgb.save(buf, format="PNG")
  return buf.getvalue()


def _features():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
      "label": tfds.features.Scalar(dtype=np.int64),
      "index": tfds.features.Scalar(dtype=np.int64),
      "path": tfds.features.Text(),
    }
  )


def _describe(image: Any, extra: Any, split: str, item: int) -> str:
  """The name used for an item in reports: extra['path'], extra, or its path."""
  if isinstance(extra, Mapping) and "path" in extra:
    return str(extra["path"])
  if isinstance(extra, (str, os.PathLike)):
    return os.fspath(extra)
  if isinstance(image, (str, os.PathLike)):
    return os.fspath(image)
  return f"{split}[{item}]"


def _make_builder(
  *, name: str, version: str, data_dir: str, description: str, examples: Mapping[str, Any]
):
  """A tfds GeneratorBasedBuilder over the given per-split example generators."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    # tfds looks up the source file of a builder class through
    # `importlib_resources`, a package tfds 4.9.10 does not install; a builder
    # without code path skips that lookup (and the checksums it serves).
    code_path = None
    VERSION = tfds.core.Version(version)

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self, description=description, features=_features(), disable_shuffling=True
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return dict(examples)

    def _generate_examples(self):  # required by the ABC; splits come above
      raise NotImplementedError

    # tfds prints "Downloading and preparing dataset Unknown size ... to <.tmp- path>"
    # and "... downloaded and prepared to <.tmp- path>": both about a folder the
    # caller never sees (the result is renamed into place), so neither is printed.
    def _log_download_bytes(self):
      pass

    def _log_download_done(self):
      pass

  _Builder.name = name
  return _Builder(data_dir=data_dir, file_format="array_record")


def write_dataset(
  name: str,
  data_dir: str,
  splits: Mapping[str, Iterable[tuple[Any, int, Any]]],
  *,
  version: str = DEFAULT_VERSION,
  on_corrupt: str = "fail",
  overwrite: bool = False,
  description: str = "",
  totals: Mapping[str, int] | None = None,
  num_shards: int | None = None,
  progress: bool = True,
) -> WriteResult:
  """Writes `splits` as the tfds array_record dataset `data_dir/name/version`.

  Args:
    name: dataset name, lower snake case (e.g. "sop", "cub").
    data_dir: root folder of prepared datasets.
    splits: split name -> iterable of `(image, label, extra)`; `image` as in
      `encode_image`, `label` an integer, `extra` None, a path string or a dict
      with "path" (stored in the `path` feature and used in reports).
    version: tfds version string "x.y.z".
    on_corrupt: "fail" raises `CorruptImageError` at the first bad image;
      "skip" leaves it out, logs its path and counts it in the result.
    overwrite: replace an existing finished version; otherwise it is an error.
    description: stored in dataset_info.json (say what `label` means).
    totals: split -> expected number of items, for the progress bar.
    num_shards: files per split; by default tfds sizes shards (64 MiB-1 GiB).
    progress: show one tqdm bar per split.

  Returns:
    A `WriteResult`; nothing is visible under `data_dir/name/version` unless the
    whole dataset was written.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top

  if on_corrupt not in ON_CORRUPT:
    raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
  if not _NAME_RE.match(name):
    raise ValueError(f"dataset name must be lower snake case ([a-z][a-z0-9_]*), got {name!r}")
  for split in splits:
    if not _NAME_RE.match(split):
      raise ValueError(f"{name}: split names must match [a-z][a-z0-9_]*, got {split!r}")
  if not splits:
    raise ValueError(f"{name}: no splits given")
  final = os.path.join(data_dir, name, version)
  if os.path.exists(final) and not overwrite:
    raise FileExistsError(f"{final} already exists; pass overwrite=True to replace it")
  os.makedirs(os.path.join(data_dir, name), exist_ok=True)
  tmp_root = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=os.path.join(data_dir, name))
  labels: dict[str, list[int]] = {s: [] for s in splits}
  skipped: dict[str, list[str]] = {s: [] for s in splits}
  failure: list[BaseException] = []

  def examples(split, items):
    try:
      yield from _examples(split, items)
    except Exception as e:  # tfds re-wraps generator errors; keep ours intact
      failure.append(e)
      raise

  def _examples(split, items):
    bar = tqdm.tqdm(
      total=(totals or {}).get(split), desc=f"{name}/{split}", unit="img", disable=not progress
    )
    with bar:  # closed on an error too, so the error's line is not glued to the bar
      yield from _split_examples(split, items, bar)
    if not labels[split]:
      raise ValueError(
        f"{name}/{split}: no usable images ({len(skipped[split])} skipped as corrupt)"
      )

  def _split_examples(split, items, bar):
    for item, entry in enumerate(items):
      bar.update(1)
      try:
        image, label, extra = entry
      except (TypeError, ValueError):
        raise ValueError(
          f"{name}/{split} item {item}: expected (image, label, extra), got {type(entry).__name__}"
        ) from None
      stored = _describe(image, extra, split, item)
      # Errors and skip lists name the file on disk when there is one.
      where = os.fspath(image) if isinstance(image, (str, os.PathLike)) else stored
      if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"{where}: label must be an integer, got {label!r}")
      try:
        data = encode_image(image, where=where)
      except CorruptImageError as e:
        if on_corrupt == "fail":
          raise
        skipped[split].append(where)
        bar.set_postfix(skipped=len(skipped[split]))
        logging.warning("skipping %s", e)
        continue
      index = len(labels[split])
      labels[split].append(int(label))
      yield index, {"image": data, "label": int(label), "index": index, "path": stored}

  was_active = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)  # ours have totals and skip counts
  try:
    builder = _make_builder(
      name=name,
      version=version,
      data_dir=tmp_root,
      description=description,
      examples={s: examples(s, items) for s, items in splits.items()},
    )
    try:
      builder.download_and_prepare(
        download_dir=os.path.join(tmp_root, "downloads"),
        download_config=tfds.download.DownloadConfig(num_shards=num_shards),
        file_format="array_record",
      )
    except Exception:
      if failure:
        raise failure[0] from None
      raise
    built = os.path.join(tmp_root, name, version)
    for split, lab in labels.items():
      np.save(os.path.join(built, f"labels-{split}.npy"), np.asarray(lab, np.int64))
    report = {
      "name": name,
      "version": version,
      "on_corrupt": on_corrupt,
      "num_examples": {s: len(v) for s, v in labels.items()},
      "skipped": skipped,
    }
    with open(os.path.join(built, "prepare_report.json"), "w") as f:
      json.dump(report, f, indent=1)
    trash = None
    if os.path.exists(final):  # overwrite: move the old one aside first
      trash = os.path.join(tmp_root, f"old-{uuid.uuid4().hex}")
      os.rename(final, trash)
    os.rename(built, final)
  finally:
    tfds.display_progress_bar(was_active)
    shutil.rmtree(tmp_root, ignore_errors=True)
  return WriteResult(path=final, num_examples=report["num_examples"], skipped=skipped)
