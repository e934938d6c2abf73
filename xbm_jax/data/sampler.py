"""P classes x K images class-balanced batch sampler, seeded, stateless and host-sharded.

The reference (and the paper) trains on batches of P classes x K images (16 x 4 = 64):
classes are drawn without replacement inside a batch, and a class with fewer than K images
is padded by resampling. This sampler derives every batch from ``(seed, step)`` alone, so
its whole resumable state is the step counter: checkpoint ``step`` and you resume the exact
order (no iterator state to pickle).

Order of classes: within an "epoch" of ``num_classes // P`` steps the classes follow one
seeded permutation (seeded by ``(seed, epoch)``), so each class appears at most once per
epoch and every eligible class appears once per epoch up to the ``num_classes % P`` left
over. Images inside a class: K drawn without replacement, seeded by ``(seed, step, class)``;
a class with n < K images yields all n images plus K - n resampled (with replacement)
from them, so no image of a small class is ever skipped.

Singleton classes (a single image): by default they are kept and padded to K copies of
the one image (the reference's behaviour); under augmentation the copies are different
views. Set ``min_class_size=2`` to drop them (a class with one image gives no positive pair
without augmentation). Classes below ``min_class_size`` are never sampled.

Multi-host: each global batch is [P * K] indices laid out class-major (class c owns rows
c*K .. c*K+K-1). Host ``process_index`` of ``process_count`` takes the contiguous block of
P / process_count whole classes, so hosts are disjoint and their concatenation in
process order is the global batch (the layout ``jax.make_array_from_process_local_data``
expects when the batch axis is sharded over hosts in process order).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

_EPOCH_TAG = 0x45504F43  # distinguishes the class-permutation stream from the image stream
_IMAGE_TAG = 0x494D4147


@dataclasses.dataclass(frozen=True)
class SamplerState:
  """The sampler's complete resumable state: the next step to produce and the seed."""

  step: int
  seed: int

  def to_dict(self) -> dict[str, int]:
    return {"step": int(self.step), "seed": int(self.seed)}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "SamplerState":
    return cls(step=int(d["step"]), seed=int(d["seed"]))


class PKSampler:
  """Class-balanced sampler: each global batch is P distinct classes x K images.

  Args:
    labels: int [N] class label of every record (only the labels are needed, no images).
    classes_per_batch: P, classes per *global* batch; must be divisible by process_count.
    samples_per_class: K, images per class per batch.
    seed: integer seed; with ``step`` it determines every batch.
    process_index, process_count: this host and the number of hosts.
    min_class_size: classes with fewer images are never sampled (default 1: keep all).
  """

  def __init__(
    self,
    labels,
    *,
    classes_per_batch: int,
    samples_per_class: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    min_class_size: int = 1,
  ):
    labels = np.asarray(labels)
    if labels.ndim != 1:
      raise ValueError(f"labels must be 1-D [N], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if classes_per_batch < 1 or samples_per_class < 1:
      raise ValueError(
        f"classes_per_batch ({classes_per_batch}) and samples_per_class "
        f"({samples_per_class}) must be >= 1"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if classes_per_batch % process_count:
      raise ValueError(
        f"classes_per_batch={classes_per_batch} must be divisible by "
        f"process_count={process_count} (each host takes whole classes)"
      )
    self.classes_per_batch = int(classes_per_batch)
    self.samples_per_class = int(samples_per_class)
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)

    # Group record indices by class once: a stable sort keeps indices ascending per class.
    order = np.argsort(labels, kind="stable")
    uniq, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    keep = counts >= min_class_size
    self.class_labels = uniq[keep]  # [C] label value of class slot c
    self._members = [
      order[s : s + n].astype(np.int64) for s, n, k in zip(starts, counts, keep) if k
    ]
    self.num_classes = len(self._members)
    if self.num_classes < self.classes_per_batch:
      raise ValueError(
        f"classes_per_batch={classes_per_batch} but the dataset has only "
        f"{self.num_classes} classes with >= {min_class_size} images "
        f"({len(uniq)} classes in total); lower classes_per_batch"
      )
    self.steps_per_epoch = self.num_classes // self.classes_per_batch
    self._perm_cache: tuple[int, np.ndarray] | None = None

  @property
  def global_batch_size(self) -> int:
    return self.classes_per_batch * self.samples_per_class

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  def _class_perm(self, epoch: int) -> np.ndarray:
    if self._perm_cache is None or self._perm_cache[0] != epoch:
      rng = np.random.default_rng([self.seed, _EPOCH_TAG, epoch])
      self._perm_cache = (epoch, rng.permutation(self.num_classes))
    return self._perm_cache[1]

  def batch_classes(self, step: int) -> np.ndarray:
    """int64 [P] class slots (0..num_classes-1) of global batch ``step``, all distinct."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    epoch, j = divmod(int(step), self.steps_per_epoch)
    p = self.classes_per_batch
    return self._class_perm(epoch)[j * p : (j + 1) * p].astype(np.int64)

  def _class_images(self, step: int, c: int) -> np.ndarray:
    members, k = self._members[c], self.samples_per_class
    rng = np.random.default_rng([self.seed, _IMAGE_TAG, int(step), int(c)])
    if len(members) >= k:
      return rng.choice(members, size=k, replace=False)
    # Pad a small class by resampling; keep all its images so none is skipped.
    extra = rng.choice(members, size=k - len(members), replace=True)
    return rng.permutation(np.concatenate([members, extra]))

  def global_batch(self, step: int) -> np.ndarray:
    """int64 [P * K] record indices of global batch ``step``, class-major."""
    return np.concatenate([self._class_images(step, c) for c in self.batch_classes(step)])

  def local_batch(self, step: int) -> np.ndarray:
    """int64 [P * K / process_count] this host's contiguous share of global batch ``step``."""
    classes = self.batch_classes(step)
    per_host = self.classes_per_batch // self.process_count
    mine = classes[self.process_index * per_host : (self.process_index + 1) * per_host]
    return np.concatenate([self._class_images(step, c) for c in mine])

  def local_offset(self) -> int:
    """Position of this host's first row inside the global batch."""
    return self.process_index * self.local_batch_size

  def state(self, step: int) -> SamplerState:
    return SamplerState(step=int(step), seed=self.seed)


def from_config(
  labels, cfg: Mapping[str, Any], *, seed: int, process_index: int = 0, process_count: int = 1
) -> PKSampler:
  """Builds a PKSampler from a config mapping with ``classes_per_batch``,
  ``samples_per_class`` and optional ``min_class_size``."""
  for key in ("classes_per_batch", "samples_per_class"):
    if key not in cfg:
      raise KeyError(f"sampler config is missing '{key}' (have {sorted(cfg.keys())})")
  return PKSampler(
    labels,
    classes_per_batch=int(cfg["classes_per_batch"]),
    samples_per_class=int(cfg["samples_per_class"]),
    min_class_size=int(cfg.get("min_class_size", 1)),
    seed=seed,
    process_index=process_index,
    process_count=process_count,
  )
