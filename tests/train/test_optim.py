"""Schedules, the plateau controller and the coupled-L2 Adam against hand computation."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from xbm_jax.train import optim


def cfg(**kw):
  c = ml_collections.ConfigDict(
    dict(
      name="adam",
      lr=0.1,
      weight_decay=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      momentum=0.9,
      schedule="constant",
      warmup_steps=0,
      decay_every=10,
      decay_factor=0.5,
    )
  )
  c.update(kw)
  return c


def test_schedules_by_hand():
  step = optim.make_schedule(cfg(schedule="step"), 100)
  assert [float(step(s)) for s in (0, 9, 10, 25)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
  cos = optim.make_schedule(cfg(schedule="cosine", warmup_steps=10), 110)
  assert float(cos(0)) == pytest.approx(0.1 * 1 / 10)  # warm-up: (s + 1) / 10
  assert float(cos(9)) == pytest.approx(0.1)
  assert float(cos(60)) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)))
  assert float(cos(110)) == pytest.approx(0.0, abs=1e-9)
  assert float(optim.make_schedule(cfg(), 5)(3)) == pytest.approx(0.1)
  # Warm-up then steps: the decay reads the absolute step; warm-up of one step.
  warm_step = optim.make_schedule(cfg(schedule="step", warmup_steps=4), 100)
  assert [float(warm_step(s)) for s in (0, 3, 4, 10, 21)] == pytest.approx(
    [0.1 / 4, 0.1, 0.1, 0.05, 0.025]
  )
  one = optim.make_schedule(cfg(warmup_steps=1), 5)
  assert [float(one(s)) for s in (0, 1)] == pytest.approx([0.1, 0.1])
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule(cfg(schedule="linear"), 5)
  with pytest.raises(ValueError, match="optimiser"):
    optim.make_direction(cfg(name="lamb"))


def test_plateau_by_hand():
  p = optim.Plateau(factor=0.5, patience=2, threshold=0.01, min_scale=0.2)
  scales = [p.update(v) for v in (0.5, 0.6, 0.605, 0.59, 0.7, 0.69, 0.69, 0.69, 0.69)]
  # best 0.5, 0.6; 0.605 and 0.59 are no improvement (> 0.01) -> halve; 0.7 best;
  # then two bad -> 0.25; two more bad -> 0.125 clipped to 0.2.
  assert scales == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2]
  q = optim.Plateau(factor=0.5, patience=2, threshold=0.01, min_scale=0.2)
  q.load_state_dict(p.state_dict())
  assert q.state_dict() == p.state_dict()


def test_adam_with_coupled_l2_first_steps_match_the_formula():
  """torch Adam(weight_decay=wd): g' = g + wd * w, then Adam on g'."""
  wd, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
  direction = optim.make_direction(cfg(weight_decay=wd))
  w = jnp.array([1.0, -2.0, 3.0])
  g = jnp.array([0.5, 0.1, -0.2])
  state = direction.init(w)
  m = v = np.zeros(3)
  for t in (1, 2):
    upd, state = direction.update(g, state, w)
    gp = np.asarray(g) + wd * np.asarray(w)
    m, v = b1 * m + (1 - b1) * gp, b2 * v + (1 - b2) * gp**2
    want = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    np.testing.assert_allclose(np.asarray(upd), want, rtol=5e-5)  # float32 vs float64
