"""Anchors scored against a reference set: the similarity matrix, the pair masks
and the `Rows` view whose reductions complete across the shards of a reference
split over a mesh axis. The machinery under `xbm_jax.losses.pairs` (where a pair loss
is written) and the built-in losses (`xbm_jax.losses`)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from xbm_jax.embeddings import Embeddings, check, valid_mask

sg = jax.lax.stop_gradient

EPS_SELF = 1e-5
EPS_SELF_16BIT = 1e-2
REDUCTIONS = ("paper", "mean")
SELF_EXCLUSIONS = ("similarity", "index", "id", "none")


def self_threshold(query, reference) -> float:
  """The default `pos_threshold` for these inputs' dtypes (see `xbm_jax.losses`)."""
  narrow = any(jnp.finfo(x.emb.dtype).bits < 32 for x in (query, reference))
  return 1.0 - (EPS_SELF_16BIT if narrow else EPS_SELF)


def similarity(query, reference) -> jax.Array:
  """`[B, R]` float32 cosine similarities of unit rows (computed in f32).

  `Precision.HIGHEST` because the self rule `S < 1 - 1e-5` needs the exact
  float32 product: at the DEFAULT precision a GPU rounds float32 operands to
  TF32 (10-bit mantissa) and a TPU to bf16, which moves a unit row's
  self-similarity by ~1e-3 and keeps the anchor's own copy as a positive.
  """
  q, r = query.emb, reference.emb
  if q.shape[-1] != r.shape[-1]:
    raise ValueError(f"query dim {q.shape[-1]} does not match reference dim {r.shape[-1]}")
  if q.dtype != r.dtype:
    q, r = q.astype(jnp.float32), r.astype(jnp.float32)
  return jnp.matmul(
    q, r.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32
  ).astype(jnp.float32)


def pair_masks(
  query,
  reference,
  sim: jax.Array,
  *,
  self_exclusion: str = "similarity",
  pos_threshold: Optional[float] = None,
  self_index: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
  """`([B, R], [B, R])` bool positive and negative pair masks.

  Positives: same label, both entries valid, minus the self pair (see
  `xbm_jax.losses`). Negatives: different label, both valid.
  """
  same = query.labels[:, None] == reference.labels[None, :]
  both = valid_mask(query)[:, None] & valid_mask(reference)[None, :]
  pos, neg = same & both, ~same & both
  if self_exclusion == "similarity":
    if pos_threshold is None:
      pos_threshold = self_threshold(query, reference)
    pos = pos & (sim < pos_threshold)
  elif self_exclusion == "index":
    if self_index is None:
      raise ValueError(
        "self_exclusion='index' needs self_index: [B] int, the reference "
        "index of each anchor's own entry (-1 for none)"
      )
    self_index = jnp.asarray(self_index)
    check_self_index(self_index, query.labels.shape)
    ref_idx = jnp.arange(reference.labels.shape[0], dtype=jnp.int32)
    pos = pos & (ref_idx[None, :] != self_index[:, None])
  elif self_exclusion == "id":
    check_ids(query, reference)
    pos = pos & (query.ids[:, None] != reference.ids[None, :])
  elif self_exclusion != "none":
    raise ValueError(f"self_exclusion must be one of {SELF_EXCLUSIONS}; got {self_exclusion!r}")
  return pos, neg


def check_ids(query, reference) -> None:
  """`self_exclusion="id"` needs image ids on both sides."""
  q_ids, r_ids = getattr(query, "ids", None), getattr(reference, "ids", None)
  if q_ids is None or r_ids is None:
    which = "query" if q_ids is None else "reference"
    raise ValueError(
      f"self_exclusion='id' needs image ids on both sides; the {which} has none "
      "(Embeddings(..., ids=...), memory.init(..., ids=True))"
    )


def check_self_index(self_index, shape) -> None:
  if jnp.shape(self_index) != tuple(shape):
    raise ValueError(f"self_index must be [B]={tuple(shape)}; got {jnp.shape(self_index)}")


class Rows(NamedTuple):
  """Anchors scored against a reference set that may be split over a mesh axis.

  With `axis=None` the reference is whole and `sim` is `[b, R]`. With a mesh
  axis each device holds a `[k, D]` slice of the reference, `sim` is ALL
  `G = n*b` anchors (all-gathered) against that slice, and the reductions
  below complete across devices with a collective. Either way they return
  one value per row `[G]` that equals the whole reference's; the library
  keeps each device's own anchors' rows at the end.
  """

  sim: jax.Array  # [G, R] f32
  pos: jax.Array  # [G, R] bool
  neg: jax.Array  # [G, R] bool
  axis: Optional[str]
  start: jax.Array  # [] int32: this device's first row in G (0 if whole)
  b: int  # local anchors
  local_valid: jax.Array  # [b] bool

  def own(self, x):
    """This device's rows of a `[G, ...]` per-anchor array."""
    if self.axis is None:
      return x
    return jax.lax.dynamic_slice_in_dim(x, self.start, self.b, axis=0)

  def across(self, op, x):
    """Completes a per-anchor reduction over the reference's slices (psum/pmin/pmax)."""
    return x if self.axis is None else op(x, self.axis)

  def sum(self, x, mask) -> jax.Array:
    """`[G]` sum over the whole reference of x where mask (x broadcasts to [G, R])."""
    return self.across(jax.lax.psum, jnp.sum(jnp.where(mask, x, 0), axis=1))

  def count(self, mask) -> jax.Array:
    """`[G]` int32 number of True entries of mask over the whole reference."""
    return self.sum(jnp.int32(1), mask)

  def min(self, x, mask, fill=float(jnp.finfo(jnp.float32).max)) -> jax.Array:
    """`[G]` minimum over the whole reference of x where mask (`fill` where none).
    Across slices the value is re-read through a psum so that the gradient
    reaches the winning entries (split evenly over ties, as `jnp.min` does)."""
    return self._extreme(x, mask, fill, jnp.min, jax.lax.pmin)

  def max(self, x, mask, fill=-float(jnp.finfo(jnp.float32).max)) -> jax.Array:
    """`[G]` maximum over the whole reference of x where mask (see `min`)."""
    return self._extreme(x, mask, fill, jnp.max, jax.lax.pmax)

  def _extreme(self, x, mask, fill, local_fn, op):
    xm = jnp.where(mask, x, fill)
    loc = local_fn(xm, axis=1)
    if self.axis is None:
      return loc
    best = op(sg(loc), self.axis)
    ties = jnp.sum(sg(xm) == best[:, None], axis=1)
    n_ties = jnp.maximum(jax.lax.psum(ties, self.axis), 1)
    delta = jnp.where(sg(loc) == best, (loc - sg(loc)) * ties, 0.0)
    return best + jax.lax.psum(delta, self.axis) / n_ties

  def log1p_sum_exp(self, x, mask) -> jax.Array:
    """`[G]` log(1 + sum over the whole reference of exp(x) where mask): stable
    (a max stabiliser taken across slices) and NaN-free in grad."""
    m = self.across(jax.lax.pmax, jnp.max(jnp.where(mask, sg(x), -jnp.inf), axis=1))
    m = jnp.maximum(m, 0.0)
    e = jnp.where(mask, jnp.exp(jnp.where(mask, x - m[:, None], 0.0)), 0.0)
    return m + jnp.log(jnp.exp(-m) + self.sum(e, True))

  def whole(self) -> "Rows":
    """This device's anchors against the WHOLE reference: `[b, R]` rows in global
    column order (an all_to_all when split), as a whole-reference `Rows`."""
    if self.axis is None:
      return self
    a2a = lambda x: jax.lax.all_to_all(x, self.axis, split_axis=0, concat_axis=1, tiled=True)
    return Rows(
      a2a(self.sim), a2a(self.pos), a2a(self.neg), None, jnp.int32(0), self.b, self.local_valid
    )


class Prepared(NamedTuple):
  """A loss's inputs made ready to score: every anchor this device scores (all of
  them, gathered, when the reference is split), and where its own ones are."""

  query: Embeddings  # [G] anchors (G = b, or n*b gathered over `axis`)
  self_index: Optional[jax.Array]  # [G] rows of this reference slice (k: none)
  start: jax.Array  # [] int32: this device's first anchor in G
  b: int
  local_valid: jax.Array  # [b] bool


def prepare(query, reference, *, axis_name, self_exclusion, self_index) -> Prepared:
  """Checks the inputs; with `axis_name`, gathers the anchors and maps GLOBAL
  `self_index` slot ids to rows of this device's reference slice."""
  check(query, "query")
  check(reference, "reference")
  local_valid, b = valid_mask(query), query.emb.shape[0]
  start = jnp.int32(0)
  if self_exclusion not in SELF_EXCLUSIONS:
    raise ValueError(f"self_exclusion must be one of {SELF_EXCLUSIONS}; got {self_exclusion!r}")
  if self_exclusion == "index" and self_index is None:
    raise ValueError(
      "self_exclusion='index' needs self_index: [B] int, the reference "
      "index of each anchor's own entry (-1 for none)"
    )
  if self_exclusion == "index":
    check_self_index(self_index, (b,))
  if axis_name is not None:
    k = reference.emb.shape[0]
    me = jax.lax.axis_index(axis_name)
    gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
    ids = None if query.ids is None else gather(query.ids)
    query = Embeddings(gather(query.emb), gather(query.labels), gather(local_valid), ids)
    start = (me * b).astype(jnp.int32)
    if self_exclusion == "index":
      # Global slot ids -> this slice's local rows; other slices' ids fall outside.
      idx = gather(jnp.asarray(self_index).astype(jnp.int32)) - me * k
      self_index = jnp.where(idx >= 0, idx, k)
  return Prepared(query, self_index, start, b, local_valid)


def score(query, reference, *, axis_name, self_exclusion, pos_threshold, self_index) -> Rows:
  """The `Rows` of `query`'s anchors against `reference` (its slice, with `axis_name`)."""
  p = prepare(
    query, reference, axis_name=axis_name, self_exclusion=self_exclusion, self_index=self_index
  )
  sim = similarity(p.query, reference)
  pos, neg = pair_masks(
    p.query,
    reference,
    sim,
    self_exclusion=self_exclusion,
    pos_threshold=pos_threshold,
    self_index=p.self_index,
  )
  return Rows(sim, pos, neg, axis_name, p.start, p.b, p.local_valid)
