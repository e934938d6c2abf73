"""A memory guard from the measure's own noise: an exact paired test on validation hits.

The drift guard (rank drift above `guard_ratio` times its memory-free reading)
rests on a ratio chosen after seeing the warm-start glyph runs, and from scratch
it never fires. This rule has no tuned ratio. It compares two readings of
Recall@k on the *same* validation queries, query by query: `with_memory` (the
model trained with the memory) against `reference` (the model without it), and
switches the memory off when the memory's losses outnumber its gains by more
than chance allows:

    gains  = #queries hit with the memory and missed by the reference
    losses = #queries missed with the memory and hit by the reference
    p = P(X >= losses), X ~ Binomial(gains + losses, 1/2)   (exact one-sided McNemar)
    switch off  <=>  p < alpha / looks

Under "the memory changes nothing", each query that differs is a gain or a loss
with probability 1/2 whatever the recall and the split's size, so `alpha` is
the false-alarm rate of one reading, and `alpha / looks` bounds that of a run
that reads `looks` times (Bonferroni). Queries that agree carry no information
about the difference and drop out. The one constant is `alpha`, a false-alarm
rate fixed before any reading, not a ratio fitted to runs.

Two references, at two costs:
  * the last memory-free reading (the evaluation just before the switch-on): free,
    but it compares against a model that has stopped improving, so it fires only
    when the memory makes the model worse than it was, not when it only slows
    the progress a memory-free run would have made;
  * an A/B arm: a memory-free copy of the train state trained over the same
    window from the switch-on, evaluated at the same steps: it detects a slower
    progress too, and costs a second train state and its steps over the window
    (about twice the window's compute), after which the losing arm is dropped.

Per-query hits come from the evaluation's per-query ranks (0-based rank of the
first positive; queries without a positive left out):

    res = metrics.retrieval_metrics(q, labels, ks=(1,), self_exclude=True, per_query=True)
    hits = (res["rank"] < 1)[res["valid"]]

Designed on: nothing was fitted. The rule was written from the two regimes the
README reports (the warm-start glyph runs, where a summed memory term cost about 3
points of R@1, and SOP-shaped data from scratch, where the memory cost 8-15 points
and the ratio guard never fired), before any per-query reading was taken, and
`alpha` = 0.01 was set before the first one. It was then read on glyph runs of
the study protocol it never saw (`benchmarks/guard_check.py`, seeds 0 and 1,
5,069 val queries; `benchmarks/out/guard_check.json`): from scratch with the
memory from step 300 it fires at the first reading after the switch-on against
both references on both seeds (R@1 0.689 / 0.694 against 0.749 / 0.760 before
the switch-on and 0.805 / 0.803 for the memory-free arm); the memory-free arms
against their own earlier readings never fire; in the pretrained regime (lr 3e-4,
memory from step 0) it fires for the summed memory term (0.850 / 0.852 against
0.887 / 0.883) and not for the averaged one (0.886 / 0.884; p = 0.42 / 0.73).
Not yet read on SOP-sized data. Queries are assumed independent (queries of one
class are correlated, which makes the test somewhat liberal); `detectable_drop`
sizes the split.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
from scipy import stats


class Verdict(NamedTuple):
  """The outcome of one paired reading.

  Attributes:
    switch_off: True when the memory's losses are significant at `alpha / looks`.
    difference: recall with the memory minus the reference's, over the same queries.
    gains: queries hit with the memory only.
    losses: queries hit by the reference only.
    p_value: exact one-sided P(X >= losses), X ~ Binomial(gains + losses, 1/2)
      (1.0 when no query differs).
    z: McNemar's statistic (gains - losses) / sqrt(gains + losses), for logs
      (0.0 when no query differs).
    n_queries: queries compared.
  """

  switch_off: bool
  difference: float
  gains: int
  losses: int
  p_value: float
  z: float
  n_queries: int


def _check_level(alpha: float, looks: int) -> float:
  """The per-reading level `alpha / looks`; a ValueError naming the bad argument."""
  if not 0.0 < alpha < 0.5:
    raise ValueError(f"alpha must be in (0, 0.5) (a false-alarm rate); got {alpha}")
  if int(looks) != looks or looks < 1:
    raise ValueError(f"looks must be a positive integer (readings per run); got {looks}")
  return alpha / int(looks)


def _hits(x, name: str) -> np.ndarray:
  """`x` as a 1-D bool array (bool, or integers / floats that are all 0 or 1)."""
  x = np.asarray(x)
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f"{name} must be a non-empty [Q] array of per-query hits; got {x.shape}")
  if x.dtype != np.bool_:
    if not np.issubdtype(x.dtype, np.number) or not np.isin(x, (0, 1)).all():
      raise ValueError(f"{name} must hold per-query hits (bool or 0/1); got other values")
    x = x.astype(bool)
  return x


def verdict(with_memory, reference, *, alpha: float = 0.01, looks: int = 1) -> Verdict:
  """Whether to switch the memory off, from per-query hits of two readings.

  Args:
    with_memory: `[Q]` bool (or 0/1) hits@k of the model trained with the memory.
    reference: `[Q]` bool hits@k on the same queries, in the same order, of the
      memory-free model (its last reading before the switch-on, or an A/B arm).
    alpha: false-alarm rate, in (0, 0.5): the chance of switching off a memory
      that changes nothing, over the whole run when `looks` is its number of
      readings.
    looks: how many readings the run makes (each is tested at `alpha / looks`).
  Returns:
    A `Verdict`. Raises ValueError for arrays of other shapes or values, or a
    bad `alpha` / `looks`, before anything is computed.
  """
  level = _check_level(alpha, looks)
  mem, ref = _hits(with_memory, "with_memory"), _hits(reference, "reference")
  if mem.shape != ref.shape:
    raise ValueError(
      f"with_memory {mem.shape} and reference {ref.shape} must score the same queries"
    )
  gains = int(np.sum(mem & ~ref))
  losses = int(np.sum(~mem & ref))
  discordant = gains + losses
  p_value = float(stats.binom.sf(losses - 1, discordant, 0.5)) if discordant else 1.0
  z = (gains - losses) / math.sqrt(discordant) if discordant else 0.0
  return Verdict(
    switch_off=p_value < level,
    difference=(gains - losses) / mem.size,
    gains=gains,
    losses=losses,
    p_value=p_value,
    z=z,
    n_queries=int(mem.size),
  )


def detectable_drop(
  *, n_queries: int, discordant_share: float, alpha: float = 0.01, looks: int = 1
) -> float:
  """The recall drop a reading detects about half of the time (normal approximation).

  With a share `s` of the `Q` queries differing between the two readings, the
  losses minus gains have a null standard deviation `sqrt(s Q)`, so a drop `delta`
  of recall is at the threshold when `delta Q = z sqrt(s Q)`, i.e.
  `delta = z sqrt(s / Q)` with `z` the one-sided normal quantile of `alpha / looks`.
  E.g. 2,000 queries, 15 % differing, alpha 0.01, one look: 0.020 (2 points).
  """
  level = _check_level(alpha, looks)
  if int(n_queries) < 1 or not 0.0 < discordant_share <= 1.0:
    raise ValueError(
      f"n_queries must be >= 1 and discordant_share in (0, 1]; got {n_queries}, {discordant_share}"
    )
  return NormalDist().inv_cdf(1.0 - level) * math.sqrt(discordant_share / int(n_queries))
