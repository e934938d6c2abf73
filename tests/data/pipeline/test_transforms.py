"""Augmentation: shapes, dtypes, hand-computed crops, seeded determinism."""

import numpy as np
import pytest

from xbm_jax.data import transforms as T


def _image(h, w, c, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def test_eval_center_crop_equals_hand_computed_slice():
  img = _image(6, 8, 3)
  cfg = T.TransformConfig(resize=6, crop=4)  # shorter side already 6: no resize
  # top = (6 - 4) / 2 = 1, left = (8 - 4) / 2 = 2
  np.testing.assert_array_equal(T.eval_transform(img, cfg), img[1:5, 2:6])
  img = _image(9, 7, 1)  # portrait, odd margins: round(1.5)=2, round(2.5)=2
  cfg = T.TransformConfig(resize=7, crop=4)
  np.testing.assert_array_equal(T.eval_transform(img, cfg), img[2:6, 2:6])


def test_eval_resizes_shorter_side_then_crops():
  img = _image(20, 40, 3)
  out = T.eval_transform(img, T.TransformConfig(resize=10, crop=8))
  assert out.shape == (8, 8, 3) and out.dtype == np.uint8
  assert T.resized_size(20, 40, 10) == (10, 20)
  assert T.resized_size(375, 500, 256) == (256, 341)  # torchvision: int(256 * 500 / 375)
  assert T.resized_size(500, 375, 256) == (341, 256)


@pytest.mark.parametrize(
  "shape,cfg",
  [
    ((32, 32, 1), T.TransformConfig(resize=32, crop=28, flip=False)),
    ((300, 400, 3), T.TransformConfig()),
    ((64, 48, 3), T.TransformConfig(resize=40, crop=32)),
  ],
)
def test_train_shapes_dtypes_and_determinism(shape, cfg):
  img = _image(*shape)
  a = T.train_transform(img, cfg, T.record_rng(1, 2, 3))
  b = T.train_transform(img, cfg, T.record_rng(1, 2, 3))
  c = T.train_transform(img, cfg, T.record_rng(1, 2, 4))
  assert a.shape == (cfg.crop, cfg.crop, shape[2]) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_train_full_crop_is_identity_and_flip_is_mirror():
  img = _image(16, 16, 3)
  cfg = T.TransformConfig(resize=16, crop=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
  np.testing.assert_array_equal(T.train_transform(img, cfg, np.random.default_rng(0)), img)
  cfg = T.TransformConfig(resize=16, crop=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True)
  outs = [T.train_transform(img, cfg, np.random.default_rng(s)) for s in range(20)]
  flipped = [np.array_equal(o, img[:, ::-1]) for o in outs]
  same = [np.array_equal(o, img) for o in outs]
  assert all(f or s for f, s in zip(flipped, same))
  assert 3 <= sum(flipped) <= 17


def test_random_resized_crop_box_within_bounds_and_scale():
  rng = np.random.default_rng(0)
  for _ in range(300):
    h = int(rng.integers(40, 300))
    w = int(h * rng.uniform(0.8, 1.25))
    top, left, ch, cw = T.random_resized_crop_box(
      int(h), int(w), scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), rng=rng
    )
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    assert ch > 0 and cw > 0
    # Rounding of w, h moves the area a little off the drawn fraction.
    assert 0.15 <= ch * cw / (h * w) <= 1.0


def test_random_resized_crop_fallback_is_centred_max_ratio_crop():
  # A 27 x 257 strip: no draw fits, so the centred crop of aspect 4/3 and full height.
  rng = np.random.default_rng(0)
  top, left, ch, cw = T.random_resized_crop_box(
    27, 257, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), rng=rng
  )
  assert (top, ch, cw) == (0, 27, 36) and left == (257 - 36) // 2


def test_config_from_mapping_and_errors():
  cfg = T.TransformConfig.from_config({"resize": 32, "crop": 28, "scale": [0.5, 1], "flip": False})
  assert cfg == T.TransformConfig(resize=32, crop=28, scale=(0.5, 1.0), flip=False)
  with pytest.raises(KeyError, match="cropp"):
    T.TransformConfig.from_config({"cropp": 3})
  with pytest.raises(ValueError, match="crop"):
    T.TransformConfig(resize=8, crop=10)
  with pytest.raises(ValueError, match="uint8"):
    T.eval_transform(np.zeros((4, 4, 3), np.float32), T.TransformConfig(resize=4, crop=4))


def _smooth(h, w, seed=0):
  """A photo-like smooth image (upsampled noise), so JPEG keeps it close."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  low = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC))


def _jpeg(img):
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=90)
  data = buf.getvalue()
  return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_jpeg_bytes_below_twice_resize_equal_the_array_path():
  """Shorter side < 2 x resize: full-scale decode, exactly the decoded array's output."""
  data, decoded = _jpeg(_smooth(500, 460))
  cfg = T.TransformConfig()
  assert T.load(data, cfg.resize)[0].size == (460, 500)
  for seed in range(4):
    np.testing.assert_array_equal(
      T.train_transform(data, cfg, T.record_rng(0, seed, 1)),
      T.train_transform(decoded, cfg, T.record_rng(0, seed, 1)),
    )
  np.testing.assert_array_equal(T.eval_transform(data, cfg), T.eval_transform(decoded, cfg))


def test_large_jpeg_decodes_reduced_with_the_same_geometry():
  """Shorter side 1100 >= 4 x 256: a 1/4-scale decode (275 px, still >= 256); the crop
  box and draws are the full-size ones, so outputs match the array path up to the
  downscale filter (a misplaced box would differ by tens of levels)."""
  data, decoded = _jpeg(_smooth(1100, 1300, seed=1))
  cfg = T.TransformConfig()
  assert T.load(data, cfg.resize)[0].size == (325, 275)
  for seed in range(4):
    a = T.train_transform(data, cfg, T.record_rng(0, seed, 1)).astype(int)
    b = T.train_transform(decoded, cfg, T.record_rng(0, seed, 1)).astype(int)
    assert np.mean(np.abs(a - b)) < 0.75, seed  # measured ~0.37; a 1 px shift ~1-1.6
  a, b = T.eval_transform(data, cfg).astype(int), T.eval_transform(decoded, cfg).astype(int)
  assert np.mean(np.abs(a - b)) < 0.75
  shifted = T.eval_transform(decoded[8:], cfg).astype(int)  # the oracle can tell a shift
  assert np.mean(np.abs(shifted - b)) > 3 * np.mean(np.abs(a - b))
