"""glyph_testbed's render-time degradation against NumPy oracles."""

import numpy as np

from xbm_jax.data import glyph_testbed as gt

ZERO = dict(
  angle=0.0,
  sx=1.0,
  sy=1.0,
  shear=0.0,
  tx=0.0,
  ty=0.0,
  stroke=0.0,
  blur=0.0,
  occlude=False,
  occ_h=0.2,
  occ_w=0.2,
  occ_y=0.0,
  occ_x=0.0,
  occ_fill=0.0,
  noise=0.0,
  noise_seed=0,
)


def _image(seed=0):
  return np.random.default_rng(seed).integers(0, 256, (32, 32)).astype(np.uint8)


def test_identity_draws_and_strength_zero_leave_the_image():
  im = _image()
  np.testing.assert_array_equal(gt.degrade_image(im, ZERO), im)
  ims = np.stack([_image(i) for i in range(4)])
  np.testing.assert_array_equal(
    gt.degrade_classes(ims, ["一", "丁"], 2, gt.Degradation(0.0), seed=0), ims
  )


def test_integer_shift_is_a_zero_filled_roll():
  im = _image(1)
  out = gt.degrade_image(im, {**ZERO, "tx": 2.0, "ty": -3.0})
  want = np.zeros_like(im)
  want[:29, 2:] = im[3:, :30]  # output (r, c) reads input (r + 3, c - 2)
  np.testing.assert_array_equal(out, want)


def test_occlusion_and_erosion_match_numpy():
  im = _image(2)
  p = {
    **ZERO,
    "occlude": True,
    "occ_h": 0.25,
    "occ_w": 0.5,
    "occ_y": 0.0,
    "occ_x": 0.99,
    "occ_fill": 255.0,
  }
  want = im.copy()
  want[:8, 16:] = 255
  np.testing.assert_array_equal(gt.degrade_image(im, p), want)
  x = im.astype(float)
  ero = np.min(
    [
      np.pad(x, ((1, 0), (1, 0)), mode="edge")[dy : dy + 32, dx : dx + 32]
      for dy in (0, 1)
      for dx in (0, 1)
    ],
    axis=0,
  )  # scipy's 2x2 origin: (-1, -1)
  got = gt.degrade_image(im, {**ZERO, "stroke": -1.0})
  np.testing.assert_array_equal(got, np.clip(np.rint(ero), 0, 255).astype(np.uint8))


def test_degradation_is_seeded_per_class_and_changes_images():
  ims = np.stack([_image(i) for i in range(6)])
  a = gt.degrade_classes(ims, ["一", "丁", "丂"], 2, gt.Degradation(1.0), seed=0)
  b = gt.degrade_classes(ims[2:], ["丁", "丂"], 2, gt.Degradation(1.0), seed=0)
  np.testing.assert_array_equal(a[2:], b)  # a class keeps its draws whatever else is built
  assert not np.array_equal(a, ims)
