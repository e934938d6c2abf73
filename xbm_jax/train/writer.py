"""One metric writer: ``metrics.jsonl`` plus TensorBoard event files, without TensorFlow.

Names are stable across the project (``train/loss``, ``train/loss_xbm``,
``train/drift@100``, ``eval/sop/recall@1``, ...). Each :meth:`MetricWriter.write_scalars`
call appends one JSON line ``{"step": int, "<name>": float, ...}`` and one TensorBoard
``Event`` whose ``Summary`` holds a ``simple_value`` per name.

The event file is written by hand: the ``Event`` / ``Summary`` protobufs are tiny, and
TFRecord framing is ``uint64 LE length, masked crc32c(length), data, masked
crc32c(data)``. So TensorFlow stays optional; TensorBoard reads the files as usual.

Resuming: pass ``resume_step`` (the restored checkpoint's step, 0 for a fresh start).
Lines of ``metrics.jsonl`` with a larger step were written after that checkpoint and are
replayed by the resumed run, so they are dropped (an unfinished last line too). Event
files are never rewritten: a new file is started with a ``SessionLog.START`` at
``resume_step + 1``, from which TensorBoard purges the orphaned later events itself.
"""
from __future__ import annotations

import io
import json
import os
import socket
import struct
import time
from typing import Any, Mapping, Optional

import numpy as np

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


# --- crc32c (Castagnoli), the checksum of TFRecord framing --------------------------
def _make_crc32c_table():
    poly = 0x82F63B78  # reflected 0x1EDC6F41
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data``: table-driven, one byte at a time in Python, ~0.2 s per MB
    (only images are that large; scalar events are ~100 bytes)."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15, add 0xa282ead8 (mod 2^32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """Frames one record: length, its masked crc, the data, its masked crc."""
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data
            + struct.pack("<I", masked_crc32c(data)))


# --- protobuf wire format, just what Event/Summary need -----------------------------
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 -> two's complement, 10 bytes
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _pb_varint(field: int, n: int) -> bytes:
    return _key(field, 0) + _varint(int(n))


def _pb_double(field: int, x: float) -> bytes:
    return _key(field, 1) + struct.pack("<d", x)


def _pb_float(field: int, x: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", x)


def _pb_bytes(field: int, b: bytes) -> bytes:
    return _key(field, 2) + _varint(len(b)) + b


def _event(step: int, *, wall_time: Optional[float] = None, summary: Optional[bytes] = None,
           file_version: Optional[str] = None, session_log: Optional[bytes] = None) -> bytes:
    """Event: wall_time=1 double, step=2 int64, file_version=3, summary=5, session_log=7."""
    msg = _pb_double(1, time.time() if wall_time is None else wall_time)
    msg += _pb_varint(2, step)
    if file_version is not None:
        msg += _pb_bytes(3, file_version.encode())
    if summary is not None:
        msg += _pb_bytes(5, summary)
    if session_log is not None:
        msg += _pb_bytes(7, session_log)
    return msg


def _scalar_value(tag: str, x: float) -> bytes:
    """Summary.Value: tag=1, simple_value=2 (float32)."""
    return _pb_bytes(1, tag.encode()) + _pb_float(2, x)


def _image_value(tag: str, png: bytes, height: int, width: int, channels: int) -> bytes:
    """Summary.Value: tag=1, image=4 {height=1, width=2, colorspace=3, encoded=4}."""
    image = (_pb_varint(1, height) + _pb_varint(2, width) + _pb_varint(3, channels)
             + _pb_bytes(4, png))
    return _pb_bytes(1, tag.encode()) + _pb_bytes(4, image)


def _text_value(tag: str, text: str) -> bytes:
    """Summary.Value: tag=1, metadata=9 {plugin_data=1 {plugin_name=1 "text"}},
    tensor=8 {dtype=1 DT_STRING(7), tensor_shape=2 {} (scalar), string_val=8}."""
    metadata = _pb_bytes(1, _pb_bytes(1, b"text"))
    tensor = _pb_varint(1, 7) + _pb_bytes(2, b"") + _pb_bytes(8, text.encode())
    return _pb_bytes(1, tag.encode()) + _pb_bytes(9, metadata) + _pb_bytes(8, tensor)


def _to_float(name: str, value: Any) -> float:
    try:
        return float(np.asarray(value).reshape(()))
    except (TypeError, ValueError) as e:
        raise ValueError(f"metric {name!r} is not a scalar number: {value!r}") from e


def _jsonable(obj):
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def truncate_jsonl(path: str, max_step: int) -> int:
    """Drops lines with ``step > max_step`` (and unparsable ones, e.g. a line cut short
    by a crash) from ``path``, atomically. Returns the number of lines dropped."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
                keep = int(rec["step"]) <= max_step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


def config_json(config: Any) -> dict:
    """The config as ``config.json`` holds it (tuples as lists), for comparisons."""
    return json.loads(json.dumps(_jsonable(config)))


class MetricWriter:
    """Writes ``<workdir>/metrics.jsonl`` and ``<workdir>/events.out.tfevents.*``.

    Args:
      workdir: the run folder (created if missing).
      resume_step: the step training resumes from; later JSONL lines are dropped and a
        TensorBoard restart marker is written (see module doc). None: plain append.
      enabled: False makes every call a no-op (non-zero hosts of a multi-host run).
      tensorboard: also write the event file.
    """

    def __init__(self, workdir: str, *, resume_step: Optional[int] = None,
                 enabled: bool = True, tensorboard: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self._jsonl = self._events = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_FILE)
        if resume_step is not None:
            truncate_jsonl(path, int(resume_step))
        self._jsonl = open(path, "a")
        if tensorboard:
            name = (f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}"
                    f".{os.getpid()}.xbm")
            self._events = open(os.path.join(workdir, name), "ab")
            self._events.write(tfrecord(_event(0, file_version="brain.Event:2")))
            if resume_step is not None:
                # SessionLog status=1 START: TensorBoard drops older events at >= step.
                self._events.write(tfrecord(_event(int(resume_step) + 1,
                                                   session_log=_pb_varint(1, 1))))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Appends ``{"step": step, **scalars}`` (values cast to float; NaN/inf are kept
        and written as JSON ``NaN`` / ``Infinity``, which Python's json reads back)."""
        if not self.enabled or not scalars:
            return
        step = int(step)
        values = {}
        for name, v in scalars.items():
            if not isinstance(name, str) or name == "step":
                raise ValueError(f"bad metric name {name!r} (a str other than 'step')")
            values[name] = _to_float(name, v)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        if self._events is not None:
            summary = b"".join(_pb_bytes(1, _scalar_value(k, v)) for k, v in values.items())
            self._events.write(tfrecord(_event(step, summary=summary)))
        # Flush per call (every few steps, not every step): a crash loses nothing
        # that the checkpoint does not also lose.
        self.flush()

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """Logs uint8 ``[H, W]`` or ``[H, W, C]`` (C = 1, 3, 4) as a PNG image summary."""
        if not self.enabled or self._events is None:
            return
        from PIL import Image

        img = np.asarray(image)
        if img.dtype != np.uint8 or img.ndim not in (2, 3) or (
                img.ndim == 3 and img.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"image {name!r} must be uint8 [H, W] or [H, W, 1|3|4], got "
                             f"{img.dtype} {img.shape}")
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        channels = 1 if img.ndim == 2 else img.shape[-1]
        value = _image_value(name, buf.getvalue(), img.shape[0], img.shape[1], channels)
        self._events.write(tfrecord(_event(int(step), summary=_pb_bytes(1, value))))
        self._events.flush()

    def write_text(self, step: int, name: str, text: str) -> None:
        """Logs a string for TensorBoard's text tab (event file only)."""
        if not self.enabled or self._events is None:
            return
        value = _text_value(name, str(text))
        self._events.write(tfrecord(_event(int(step), summary=_pb_bytes(1, value))))

    def write_config(self, config: Any) -> None:
        """Saves ``config`` (dict or ConfigDict) as ``<workdir>/config.json`` (atomic)
        and as a text summary ``config`` at step 0."""
        if not self.enabled:
            return
        blob = json.dumps(_jsonable(config), indent=2, sort_keys=True)
        path = os.path.join(self.workdir, CONFIG_FILE)
        with open(path + ".tmp", "w") as f:
            f.write(blob + "\n")
        os.replace(path + ".tmp", path)
        self.write_text(0, "config", "```\n" + blob + "\n```")

    def flush(self) -> None:
        for f in (self._jsonl, self._events):
            if f is not None:
                f.flush()

    def close(self) -> None:
        for f in (self._jsonl, self._events):
            if f is not None:
                f.close()
        self._jsonl = self._events = None
        self.enabled = False

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
