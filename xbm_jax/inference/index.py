"""An index of embeddings with ids, paths and (optional) labels: add, save, load, search.

File format (`.npz`, uncompressed, written to a temporary file then `os.replace`d, so
a reader never sees half a file): `emb` float32 `[N, D]`, `ids` int64 `[N]`, `labels`
int64 `[N]` (-1 where unlabelled), `paths` str `[N]` ("" where none), `labelled` bool
(every row has a label), `version` int. `Index.add` keeps the chunks it is given and
`save` streams them into the file, so building an index holds the embeddings about
once (no concatenated copy); the first search joins them.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Optional

import numpy as np

from xbm_jax.inference import search as search_lib
from xbm_jax.train.errors import DataError, UserError

VERSION = 1
KEYS = ("emb", "ids", "labels", "paths", "labelled", "version")


class IndexError_(UserError, ValueError):
  """A wrong or unreadable index file, or rows that do not fit the index."""


class Index:
  """Embeddings `[N, D]` float32 with `ids`, `labels`, `paths` per row.

  Args:
    dim: D; every added row must have it.
    labelled: whether rows carry labels (calibration needs them).
  """

  def __init__(self, dim: int, *, labelled: bool = True):
    self.dim, self.labelled = int(dim), bool(labelled)
    self._chunks: list[tuple] = []  # (emb, ids, labels, paths), joined lazily
    self._searchers: dict = {}

  def __len__(self) -> int:
    return sum(len(c[0]) for c in self._chunks)

  def add(self, emb, *, ids=None, labels=None, paths=None) -> "Index":
    """Appends rows. emb: float `[n, D]` (finite). ids: int `[n]` (default: the next
    row numbers). labels: int `[n]`, or None for unlabelled rows (then the whole
    index is unlabelled). paths: str `[n]` or None."""
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[1] != self.dim:
      raise IndexError_(f"embeddings of shape {emb.shape} do not fit an index of dim {self.dim}")
    if not np.issubdtype(emb.dtype, np.floating):
      raise IndexError_(f"embeddings must be floating point, got dtype {emb.dtype}")
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():  # NaN scores would rank first and match everything
      raise IndexError_(
        f"{int(bad.sum())} embedding rows are NaN/inf (first {int(np.argmax(bad))})"
      )
    n = len(emb)
    ids = np.arange(len(self), len(self) + n) if ids is None else np.asarray(ids)
    if labels is None:
      self.labelled, labels = False, np.full((n,), -1)
    paths = np.full((n,), "", dtype=str) if paths is None else np.asarray(paths, dtype=str)
    for name, x in (("ids", ids), ("labels", np.asarray(labels)), ("paths", paths)):
      if x.shape != (n,):
        raise IndexError_(f"{name} of shape {x.shape} for {n} embeddings; expected [{n}]")
    for name, x in (("ids", ids), ("labels", np.asarray(labels))):
      if not np.issubdtype(x.dtype, np.integer):
        raise IndexError_(f"{name} must be integers, got dtype {x.dtype}")
    chunk = (emb.astype(np.float32, copy=False), ids.astype(np.int64, copy=False))
    self._chunks.append(chunk + (np.asarray(labels, np.int64), paths))
    self._searchers.clear()
    return self

  def _joined(self, i: int) -> np.ndarray:
    if not self._chunks:
      return np.zeros((0, self.dim) if i == 0 else (0,), (np.float32, np.int64, np.int64, str)[i])
    if len(self._chunks) > 1:
      self._chunks = [tuple(np.concatenate([c[j] for c in self._chunks]) for j in range(4))]
    return self._chunks[0][i]

  emb = property(lambda self: self._joined(0), doc="float32 `[N, D]`.")
  ids = property(lambda self: self._joined(1), doc="int64 `[N]`.")
  labels = property(lambda self: self._joined(2), doc="int64 `[N]`, -1 where unlabelled.")
  paths = property(lambda self: self._joined(3), doc="str `[N]`.")

  def save(self, path: str) -> None:
    """Writes the index atomically (temporary file in the same folder, then rename)."""
    if len(self) == 0:
      raise IndexError_(f"refusing to save an empty index to {path}")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".index-", suffix=".tmp", dir=folder)
    try:
      with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        for j, key in enumerate(KEYS[:4]):
          _write_stream(zf, key, [c[j] for c in self._chunks])
        _write_stream(zf, "labelled", [np.asarray(self.labelled)])
        _write_stream(zf, "version", [np.asarray(VERSION)])
      os.replace(tmp, path)
    except BaseException:
      os.unlink(tmp)
      raise

  @classmethod
  def load(cls, path: str, *, dim: Optional[int] = None) -> "Index":
    """Reads an index file; checks its keys, dtypes, shapes and (if given) `dim`."""
    if not os.path.isfile(path):
      raise DataError(f"no index file {path}")
    try:
      with np.load(path, allow_pickle=False) as z:
        missing = [k for k in KEYS if k not in z.files]
        if missing:
          raise IndexError_(f"{path} is not an index file (no {missing})")
        arr = {k: z[k] for k in KEYS}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
      if isinstance(e, UserError):
        raise
      raise IndexError_(f"{path} is not a readable index file ({e})") from e
    emb = arr["emb"]
    if int(arr["version"]) != VERSION:
      raise IndexError_(f"{path}: index version {int(arr['version'])}, this code reads {VERSION}")
    if emb.ndim != 2 or emb.dtype != np.float32:
      raise IndexError_(f"{path}: emb is {emb.dtype} {emb.shape}, expected float32 [N, D]")
    if dim is not None and emb.shape[1] != dim:
      raise IndexError_(f"{path} holds {emb.shape[1]}-d embeddings; the model makes {dim}-d ones")
    if len(emb) == 0:
      raise IndexError_(f"{path}: the index is empty")
    out = cls(emb.shape[1], labelled=bool(arr["labelled"]))
    try:
      out.add(emb, ids=arr["ids"], labels=arr["labels"], paths=arr["paths"])
    except IndexError_ as e:
      raise IndexError_(f"{path}: {e}") from None
    out.labelled = bool(arr["labelled"])
    return out

  def search(self, queries, k: int, *, backend: str = "exact", mesh=None):
    """`[Q, D]` queries -> `(scores float32 [Q, k'], rows int64 [Q, k'])`, k' = min(k, N),
    best first, ties by smaller row (the row's id, label, path: `ids[rows]`, ...)."""
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != self.dim:
      raise IndexError_(f"queries of shape {q.shape} do not fit an index of dim {self.dim}")
    if len(self) == 0:
      raise IndexError_("search of an empty index")
    if k < 1:
      raise IndexError_(f"k must be >= 1, got {k}")
    key = (backend, mesh)
    if key not in self._searchers:
      self._searchers[key] = search_lib.make_searcher(self.emb, backend=backend, mesh=mesh)
    return self._searchers[key].search(q, k)


def _write_stream(zf: zipfile.ZipFile, key: str, chunks: list) -> None:
  """One `.npy` member of the chunks joined along axis 0, written chunk by chunk."""
  first = chunks[0]
  shape = (sum(len(c) for c in chunks),) + first.shape[1:] if first.ndim else ()
  dtype = first.dtype
  if dtype.kind == "U":  # one width for every chunk's strings
    dtype = np.dtype(f"<U{max(max(c.dtype.itemsize // 4, 1) for c in chunks)}")
  header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
  with zf.open(key + ".npy", "w", force_zip64=True) as f:
    np.lib.format.write_array_header_2_0(f, header)
    for c in chunks:
      f.write(np.ascontiguousarray(c, dtype=dtype).data)
