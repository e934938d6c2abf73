"""Image augmentation on uint8 numpy arrays (PIL resampling), seeded per record.

As the reference: train = Resize(shorter side -> ``resize``) -> RandomResizedCrop(``crop``,
scale ``scale``, aspect ``ratio``) -> horizontal flip (p = 0.5); eval = Resize(shorter side
-> ``resize``) -> CenterCrop(``crop``). Normalisation (mean/std) is left to the model on
device so batches stay uint8 (4x less host->device traffic).

The train path folds "resize then crop then resize" into one PIL resize with a source box
in original-image coordinates: the same geometry as torchvision's two steps, one resampling
instead of two (faster, slightly less blur). The crop box is drawn as torchvision's
``RandomResizedCrop.get_params`` draws it, on the resized image's size.

Images come as uint8 arrays, or as encoded bytes (a JPEG straight from the record), which
``load`` decodes. A JPEG is decoded at a reduced DCT scale (libjpeg's 1/2, 1/4, 1/8 via
PIL ``Image.draft``) only when the reduced image still has at least the resolution of the
reference's ``Resize(resize)`` image in both sides, i.e. never below the pixels the
reference itself resamples from. The crop geometry and every random draw are unchanged
(they are computed on the full-size image's dimensions); what changes is the pixel values:
the first 1/s downscale is the DCT's (a box-like filter) instead of PIL's bilinear one.
SOP-like 500 px photos (shorter side < 2 x 256) always decode at full scale, so their
augmentation is exactly the array path's.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Mapping, Union

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class TransformConfig:
  """Sizes of the augmentation. SOP-like: resize 256, crop 224; glyph demo: 32 / 28."""

  resize: int = 256
  crop: int = 224
  scale: tuple[float, float] = (0.2, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True

  def __post_init__(self):
    if self.crop > self.resize:
      raise ValueError(f"transform crop ({self.crop}) must be <= resize ({self.resize})")
    if not 0 < self.scale[0] <= self.scale[1] <= 1:
      raise ValueError(f"transform scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")

  @classmethod
  def from_config(cls, cfg: "TransformConfig | Mapping[str, Any] | None") -> "TransformConfig":
    """Accepts a TransformConfig, a dict or ml_collections.ConfigDict (unknown keys error)."""
    if cfg is None:
      return cls()
    if isinstance(cfg, cls):
      return cfg
    d = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise KeyError(f"unknown transform config keys {sorted(unknown)}; known {sorted(known)}")
    for k in ("scale", "ratio"):
      if k in d:
        d[k] = tuple(float(x) for x in d[k])
    return cls(**d)


ImageLike = Union[np.ndarray, bytes]


def _to_pil(image: np.ndarray) -> Image.Image:
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"image must be uint8 [H, W, 1|3], got {image.dtype} {image.shape}")
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def load(image: ImageLike, resize: int) -> tuple[Image.Image, int, int, int]:
  """``(PIL image, full height, full width, channels)`` of an array or encoded bytes.

  Encoded JPEGs decode at the smallest DCT scale whose shorter side stays >= ``resize``
  (see module doc); the returned height/width are the full-size image's, so callers draw
  crops in full-size coordinates and scale them by ``img.width / width``.
  """
  if isinstance(image, (bytes, bytearray, memoryview)):
    img = Image.open(io.BytesIO(image))
    h, w = img.height, img.width
    rh, rw = resized_size(h, w, resize)
    if img.format == "JPEG":
      img.draft("RGB", (rw, rh))  # the largest 1/s reduction still >= (rw, rh)
    return (img if img.mode == "RGB" else img.convert("RGB")), h, w, 3
  image = np.asarray(image)
  return _to_pil(image), image.shape[0], image.shape[1], image.shape[-1]


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
  out = np.asarray(img, dtype=np.uint8)
  return out[..., None] if channels == 1 else out


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
  """(h, w) after resizing the shorter side to ``size`` (torchvision Resize(int) rule)."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def center_crop_box(height: int, width: int, crop: int) -> tuple[int, int]:
  """(top, left) of a centred crop, torchvision's rounding."""
  return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def random_resized_crop_box(
  height: int, width: int, *, scale, ratio, rng: np.random.Generator
) -> tuple[int, int, int, int]:
  """(top, left, h, w) as torchvision RandomResizedCrop.get_params (10 tries, then centre)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the largest centred crop whose aspect is inside ``ratio``.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def eval_transform(image: ImageLike, cfg: TransformConfig) -> np.ndarray:
  """uint8 [H, W, C] (or encoded bytes) -> uint8 [crop, crop, C]: shorter side to
  ``resize``, centre crop."""
  img, height, width, c = load(image, cfg.resize)
  h, w = resized_size(height, width, cfg.resize)
  if (h, w) != (img.height, img.width):
    img = img.resize((w, h), Image.BILINEAR)
  top, left = center_crop_box(h, w, cfg.crop)
  return _from_pil(img, c)[top : top + cfg.crop, left : left + cfg.crop]


def train_transform(image: ImageLike, cfg: TransformConfig, rng: np.random.Generator) -> np.ndarray:
  """uint8 [H, W, C] (or encoded bytes) -> uint8 [crop, crop, C]: random resized crop
  (+ flip), seeded by rng."""
  img, height, width, c = load(image, cfg.resize)
  rh, rw = resized_size(height, width, cfg.resize)
  top, left, h, w = random_resized_crop_box(rh, rw, scale=cfg.scale, ratio=cfg.ratio, rng=rng)
  # Map the box on the resized image back to the decoded image: one resampling. A
  # 1/s-scale decode's pixel i covers full-size pixels [s i, s (i + 1)): divide by s.
  s = round(width / img.width)
  sy, sx = height / rh / s, width / rw / s
  box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
  img = img.resize((cfg.crop, cfg.crop), Image.BILINEAR, box=box)
  if cfg.flip and rng.random() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  return _from_pil(img, c)


def record_rng(seed: int, step: int, slot: int) -> np.random.Generator:
  """The augmentation stream of one record: global batch ``step``, row ``slot``.

  Keyed by the global row, so a record's augmentation does not depend on the number of
  hosts or workers.
  """
  return np.random.default_rng([int(seed), int(step), int(slot)])
