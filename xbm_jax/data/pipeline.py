"""Host input pipeline: P x K sampled, augmented uint8 batches via grain.

``train_batches`` yields this host's share of every global batch, ready for
``jax.make_array_from_process_local_data``:
``{"image": uint8 [b, crop, crop, C], "label": int32 [b], "index": int32 [b]}`` (each row's
record index in the source, its image id) with b = global / process_count.
Each grain element is one whole step (the sampler's indices for ``(seed, step)`` ->
decode -> augment -> stack), so workers (``worker_count`` > 0, grain ``mp_prefetch``)
produce whole batches in step order and the output does not depend on the worker count.

Resuming: the iterator's state is ``{"step", "seed"}`` (see ``TrainBatches.get_state``);
pass it back as ``state=`` to ``train_batches`` to continue the exact order. The step
counts batches *handed to the caller*, not batches prefetched by workers.

Workers are spawned processes that receive a pickled copy of the source and transform
(sources must pickle; tfds-backed ones reopen their files), and a script using them needs
the ``if __name__ == "__main__":`` guard. Start-up takes seconds (each worker imports
this package), so ``worker_count=0`` suits tests and tiny datasets.

``eval_batches`` walks a source in order, each host a contiguous chunk, and pads the last
batch to the full size with ``mask`` False (all hosts yield the same number of batches).

``worker_count`` may be -1 or "auto": one worker per usable core, minus one for the main
process (``resolve_worker_count``). ``prefetch_to_device`` moves batches onto the devices
from a background thread, ``size`` steps ahead, so the host work and the transfer overlap
the training step.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Iterator, Mapping

import grain
import numpy as np

from xbm_jax.data import sampler as sampler_lib
from xbm_jax.data import transforms

_FOREVER = 1 << 50  # "infinite" number of steps; grain's range dataset is lazy


def resolve_worker_count(worker_count: int | str) -> int:
  """Grain worker processes for ``worker_count``: an int >= 0 as is; -1 or "auto" -> the
  usable cores minus one (the main process feeds the devices), 0 on a 1-core machine."""
  if worker_count == "auto" or worker_count == -1:
    try:
      cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
      cores = os.cpu_count() or 1
    return max(cores - 1, 0)
  n = int(worker_count)
  if n < 0:
    raise ValueError(f"worker_count must be >= 0, -1 or 'auto'; got {worker_count!r}")
  return n


def _to_iter(
  ds: grain.MapDataset, *, worker_count: int | str, read_threads: int, prefetch_batches: int
) -> grain.IterDataset:
  # grain's default ReadOptions prefetch 500 elements on 16 threads; an element here is a
  # whole batch (64 x 224 x 224 x 3 = 9.6 MB), so keep the read-ahead to a few batches.
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
  )
  worker_count = resolve_worker_count(worker_count)
  if worker_count <= 0:
    return ds
  # grain's worker processes read absl flags; outside an absl app (tests, notebooks) they
  # are unparsed and grain raises. Mark them parsed with their defaults, keeping any values
  # an absl app has already parsed.
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


class _TrainStep:
  """Picklable step -> host batch function (grain workers receive a copy)."""

  def __init__(
    self, source, sampler: sampler_lib.PKSampler, cfg: transforms.TransformConfig, seed: int
  ):
    self.source, self.sampler, self.cfg, self.seed = source, sampler, cfg, seed

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    idx = self.sampler.local_batch(step)
    off = self.sampler.local_offset()
    images, labels = [], []
    for j, i in enumerate(idx):
      rec = self.source[int(i)]
      rng = transforms.record_rng(self.seed, step, off + j)
      images.append(transforms.train_transform(rec["image"], self.cfg, rng))
      labels.append(rec["label"])
    # "index": each row's record index in `source` (its image id; global across hosts).
    return {
      "image": np.stack(images),
      "label": np.asarray(labels, np.int32),
      "index": np.asarray(idx, np.int32),
    }


class TrainBatches(Iterator[dict]):
  """Iterator of host batches with a tiny resumable state (the next step and the seed)."""

  def __init__(
    self,
    fn: _TrainStep,
    *,
    start_step: int,
    num_steps: int | None,
    worker_count: int | str,
    read_threads: int = 1,
    prefetch_batches: int = 2,
  ):
    stop = _FOREVER if num_steps is None else start_step + num_steps
    ds = _to_iter(
      grain.MapDataset.range(start_step, stop).map(fn),
      worker_count=worker_count,
      read_threads=read_threads,
      prefetch_batches=prefetch_batches,
    )
    self._ds = ds
    self._it = iter(ds)
    self._step = start_step
    self._seed = fn.seed
    self.sampler = fn.sampler

  @property
  def step(self) -> int:
    """Index of the next global batch this iterator will return."""
    return self._step

  def get_state(self) -> dict[str, int]:
    return sampler_lib.SamplerState(step=self._step, seed=self._seed).to_dict()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self._step += 1
    return batch

  def close(self):
    """Stops worker processes (if any)."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()
    self._it = iter(())


def train_batches(
  source,
  *,
  sampler,
  transform_cfg,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  worker_count: int | str = 0,
  seed: int = 0,
  state: Mapping[str, Any] | None = None,
  num_steps: int | None = None,
  read_threads: int = 1,
  prefetch_batches: int = 2,
) -> TrainBatches:
  """Infinite (or ``num_steps``) iterator of augmented P x K host batches.

  Args:
    source: random access, ``len``, ``source[i] -> {"image": uint8 [H, W, C], "label"}``
      and ``source.labels`` int [N] (labels without decoding images).
    sampler: a ``PKSampler`` or a config mapping with ``classes_per_batch``,
      ``samples_per_class`` (optional ``min_class_size``); a mapping is built with
      ``seed``, ``process_index`` and ``process_count``.
    transform_cfg: ``TransformConfig`` or mapping (resize, crop, scale, ratio, flip).
    global_batch_size: must equal P * K (checked, so a config mismatch fails loudly).
    worker_count: grain worker processes (0 = in this process; -1 or "auto": one per core
      but one, see ``resolve_worker_count``).
    seed: seeds the sampler (when built here) and the per-record augmentation.
    state: a ``get_state()`` dict to resume from; default starts at step 0.
    num_steps: stop after this many batches (default: never).
    read_threads, prefetch_batches: grain threads per process (0 = no thread; PIL work
      releases the GIL, so 1-2 overlap decoding with the training step) and batches read
      ahead per process.
  Returns:
    ``TrainBatches`` yielding ``{"image": uint8 [b, crop, crop, C], "label": int32 [b],
    "index": int32 [b]}`` (each row's record index in ``source``), b = global_batch_size
    // process_count.
  """
  if not isinstance(sampler, sampler_lib.PKSampler):
    sampler = sampler_lib.from_config(
      np.asarray(source.labels),
      sampler,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
    )
  if (sampler.process_index, sampler.process_count) != (process_index, process_count):
    raise ValueError(
      f"sampler is for host {sampler.process_index}/{sampler.process_count} but "
      f"train_batches got process_index={process_index}, process_count={process_count}"
    )
  if sampler.global_batch_size != global_batch_size:
    raise ValueError(
      f"global_batch_size={global_batch_size} != classes_per_batch x samples_per_class "
      f"= {sampler.classes_per_batch} x {sampler.samples_per_class}"
    )
  start = 0 if state is None else sampler_lib.SamplerState.from_dict(state).step
  if state is not None and int(state["seed"]) != seed:
    raise ValueError(f"saved pipeline seed {state['seed']} != seed {seed}")
  cfg = transforms.TransformConfig.from_config(transform_cfg)
  fn = _TrainStep(source, sampler, cfg, seed)
  return TrainBatches(
    fn,
    start_step=start,
    num_steps=num_steps,
    worker_count=worker_count,
    read_threads=read_threads,
    prefetch_batches=prefetch_batches,
  )


class _EvalBatch:
  """Picklable batch-number -> padded eval batch function."""

  def __init__(self, source, cfg: transforms.TransformConfig, lo: int, hi: int, size: int):
    self.source, self.cfg, self.lo, self.hi, self.size = source, cfg, lo, hi, size

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    pos = self.lo + b * self.size + np.arange(self.size)
    mask = pos < self.hi
    # Padding rows repeat a real record (so shapes match) and are masked out.
    idx = np.where(mask, pos, self.hi - 1 if self.hi > self.lo else 0)
    images, labels = [], []
    for i in idx:
      rec = self.source[int(i)]
      images.append(transforms.eval_transform(rec["image"], self.cfg))
      labels.append(rec["label"])
    return {
      "image": np.stack(images),
      "label": np.asarray(labels, np.int32),
      "index": idx.astype(np.int32),
      "mask": mask,
    }


def eval_batches(
  source,
  *,
  batch_size: int,
  transform_cfg,
  process_index: int = 0,
  process_count: int = 1,
  worker_count: int | str = 0,
  read_threads: int = 1,
  prefetch_batches: int = 2,
) -> Iterator[dict]:
  """One ordered pass over ``source`` in batches of ``batch_size // process_count`` per host.

  Host p takes the contiguous chunk [p * n, (p + 1) * n) with n = ceil(N / process_count),
  and every host yields ceil(n / b) batches so the global arrays line up.

  Yields:
    ``{"image": uint8 [b, crop, crop, C], "label": int32 [b], "index": int32 [b],
    "mask": bool [b]}``; padding rows (mask False) repeat a real record.
  """
  n_total = len(source)
  if n_total == 0:
    raise ValueError("eval_batches: the source is empty")
  if batch_size % process_count:
    raise ValueError(f"eval batch_size={batch_size} not divisible by process_count={process_count}")
  b = batch_size // process_count
  per_host = -(-n_total // process_count)
  lo = min(process_index * per_host, n_total)
  hi = min(lo + per_host, n_total)
  num_batches = -(-per_host // b)
  cfg = transforms.TransformConfig.from_config(transform_cfg)
  ds = grain.MapDataset.range(num_batches).map(_EvalBatch(source, cfg, lo, hi, b))
  return iter(
    _to_iter(
      ds, worker_count=worker_count, read_threads=read_threads, prefetch_batches=prefetch_batches
    )
  )


_END = object()


class DevicePrefetch(Iterator[Any]):
  """Iterator of ``put(batch)`` computed ``size`` batches ahead in a daemon thread.

  ``put`` is e.g. ``lambda b: parallel.global_batch(b, mesh)``: a device transfer issued
  while the device runs the current step. ``get_state()`` is the wrapped iterator's state
  as of the batches handed out (not the ones read ahead), so checkpoints resume exactly.
  Errors in the thread re-raise on the next ``next()``.
  """

  def __init__(self, batches: Iterator, put: Callable[[Any], Any], size: int = 2):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1; got {size}")
    self._batches = batches
    self._state = batches.get_state() if hasattr(batches, "get_state") else None
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, args=(put,), daemon=True)
    self._thread.start()

  def _fill(self, put):
    try:
      for batch in self._batches:
        state = self._batches.get_state() if self._state is not None else None
        item = (put(batch), state)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set():
          return
      self._queue.put((_END, None))
    except BaseException as e:  # pylint: disable=broad-except
      self._queue.put((e, None))

  def __iter__(self):
    return self

  def __next__(self):
    item, state = self._queue.get()
    if item is _END:
      self._queue.put((_END, None))  # stay exhausted
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    self._state = state
    return item

  def get_state(self):
    return self._state

  def close(self):
    """Stops the thread, then closes the wrapped iterator (its workers, if any)."""
    self._stop.set()
    self._thread.join(timeout=10)
    close = getattr(self._batches, "close", None)
    if close is not None:
      close()


def prefetch_to_device(
  batches: Iterator, put: Callable[[Any], Any], size: int = 2
) -> DevicePrefetch:
  """``put(b)`` for each host batch b, ``size`` batches ahead (see ``DevicePrefetch``)."""
  return DevicePrefetch(batches, put, size)
