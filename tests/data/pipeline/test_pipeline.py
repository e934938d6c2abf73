"""Input pipeline: batches follow the sampler, hosts split the global batch, resume,
eval padding masks, worker sizing, device prefetch."""

import time

import numpy as np
import pytest

from xbm_jax.data import pipeline, transforms
from xbm_jax.data.sampler import PKSampler
from xbm_jax.data.sources import ArraySource

TCFG = {"resize": 16, "crop": 12, "flip": True}


@pytest.fixture(scope="module")
def source():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(12) * 10, [3, 4, 5, 2, 6, 4, 4, 1, 5, 3, 4, 4])
  images = rng.integers(0, 256, (len(labels), 18, 20, 3), dtype=np.uint8)
  return ArraySource(images, labels)


def _train(source, **kw):
  args = dict(
    sampler={"classes_per_batch": 4, "samples_per_class": 2},
    transform_cfg=TCFG,
    global_batch_size=8,
    seed=3,
  )
  args.update(kw)
  return pipeline.train_batches(source, **args)


def test_train_batches_follow_sampler(source):
  it = _train(source)
  ref = PKSampler(source.labels, classes_per_batch=4, samples_per_class=2, seed=3)
  for step in range(4):
    b = next(it)
    assert b["image"].shape == (8, 12, 12, 3) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int32
    idx = ref.global_batch(step)
    np.testing.assert_array_equal(b["label"], source.labels[idx])
    np.testing.assert_array_equal(b["index"], idx)  # image ids: the records' indices
    assert b["index"].dtype == np.int32
    # Row j is record idx[j] augmented with the stream keyed by (seed, step, j).
    cfg = transforms.TransformConfig.from_config(TCFG)
    for j in (0, 5):
      want = transforms.train_transform(
        source[idx[j]]["image"], cfg, transforms.record_rng(3, step, j)
      )
      np.testing.assert_array_equal(b["image"][j], want)
  assert it.get_state() == {"step": 4, "seed": 3}


def test_two_hosts_concatenate_to_the_one_host_batch(source):
  one = _train(source)
  hosts = [_train(source, process_index=h, process_count=2) for h in range(2)]
  for _ in range(3):
    full = next(one)
    parts = [next(h) for h in hosts]
    for key in ("image", "label", "index"):  # ids are global record indices
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    assert not set(parts[0]["label"]) & set(parts[1]["label"])


def test_resume_from_state_equals_uninterrupted(source):
  ref = _train(source)
  want = [next(ref) for _ in range(7)]
  first = _train(source)
  for _ in range(4):
    next(first)
  state = first.get_state()
  resumed = _train(source, state=state)
  assert resumed.step == 4
  for w in want[4:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], w["image"])
    np.testing.assert_array_equal(got["label"], w["label"])
  with pytest.raises(ValueError, match="seed"):
    _train(source, state={"step": 4, "seed": 99})


def test_num_steps_and_config_errors(source):
  assert len(list(_train(source, num_steps=3))) == 3
  with pytest.raises(ValueError, match="global_batch_size=6"):
    _train(source, global_batch_size=6)
  with pytest.raises(ValueError, match="classes_per_batch=20"):
    _train(source, sampler={"classes_per_batch": 20, "samples_per_class": 2}, global_batch_size=40)
  with pytest.raises(KeyError, match="samples_per_class"):
    _train(source, sampler={"classes_per_batch": 4})


def test_eval_batches_pad_last_batch_with_mask(source):
  n = len(source)  # 45
  cfg = {"resize": 16, "crop": 12}
  batches = list(pipeline.eval_batches(source, batch_size=8, transform_cfg=cfg))
  assert len(batches) == -(-n // 8)
  masks = np.concatenate([b["mask"] for b in batches])
  assert masks.dtype == np.bool_ and masks.sum() == n
  assert masks[:n].all() and not masks[n:].any()  # only the tail is padding
  idx = np.concatenate([b["index"] for b in batches])[masks]
  np.testing.assert_array_equal(idx, np.arange(n))
  labels = np.concatenate([b["label"] for b in batches])[masks]
  np.testing.assert_array_equal(labels, source.labels)
  tc = transforms.TransformConfig.from_config(cfg)
  last = batches[-1]
  np.testing.assert_array_equal(
    last["image"][0], transforms.eval_transform(source[n - 5]["image"], tc)
  )
  assert all(b["image"].shape == (8, 12, 12, 3) for b in batches)


def test_eval_batches_two_hosts_cover_everything_once(source):
  cfg = {"resize": 16, "crop": 12}
  per_host = [
    list(
      pipeline.eval_batches(
        source, batch_size=8, transform_cfg=cfg, process_index=h, process_count=2
      )
    )
    for h in range(2)
  ]
  assert len(per_host[0]) == len(per_host[1])  # same step count per host
  assert all(b["image"].shape[0] == 4 for bs in per_host for b in bs)
  idx = np.concatenate([b["index"][b["mask"]] for bs in per_host for b in bs])
  np.testing.assert_array_equal(np.sort(idx), np.arange(len(source)))


def test_host_batch_feeds_make_array_from_process_local_data(source):
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  n = jax.device_count()
  it = pipeline.train_batches(
    source,
    sampler={"classes_per_batch": n, "samples_per_class": 1},
    transform_cfg=TCFG,
    global_batch_size=n,
    seed=0,
  )
  batch = next(it)
  mesh = jax.make_mesh((n,), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  arrays = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
  assert arrays["image"].shape == (n, 12, 12, 3) and arrays["image"].dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(arrays["label"]), batch["label"])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(source):
  # One grain worker process (spawn: a few seconds to start); same order and content.
  ref = _train(source, num_steps=3)
  got = _train(source, num_steps=3, worker_count=1)
  for want, have in zip(ref, got):
    np.testing.assert_array_equal(have["image"], want["image"])
    np.testing.assert_array_equal(have["label"], want["label"])
  assert got.get_state() == {"step": 3, "seed": 3}


def test_worker_count_auto_is_cores_minus_one(monkeypatch):
  for cores, want in ((16, 15), (2, 1), (1, 0)):
    monkeypatch.setattr(
      pipeline.os, "sched_getaffinity", lambda _, c=cores: set(range(c)), raising=False
    )
    assert pipeline.resolve_worker_count("auto") == want
    assert pipeline.resolve_worker_count(-1) == want
  assert pipeline.resolve_worker_count(3) == 3
  with pytest.raises(ValueError, match="worker_count"):
    pipeline.resolve_worker_count(-2)


def test_prefetch_to_device_keeps_order_and_the_consumed_state(source):
  """The wrapper reads ahead, yet its state is that of the batches handed out: resuming
  from it gives the batch that comes next (oracle: the un-prefetched iterator)."""
  ref = [b["label"] for b in _train(source, num_steps=6)]
  inner = _train(source, num_steps=6)
  it = pipeline.prefetch_to_device(inner, lambda b: {**b, "put": True}, size=2)
  got = [next(it) for _ in range(3)]
  for g, r in zip(got, ref):
    assert g["put"]
    np.testing.assert_array_equal(g["label"], r)
  for _ in range(100):  # let the thread run ahead (queue of 2 + one in hand)
    if inner.step >= 6:
      break
    time.sleep(0.02)
  assert inner.step == 6 and it.get_state() == {"step": 3, "seed": 3}
  resumed = _train(source, num_steps=3, state=it.get_state())
  np.testing.assert_array_equal(next(resumed)["label"], ref[3])
  assert [b["label"].tolist() for b in it] == [r.tolist() for r in ref[3:]]
  with pytest.raises(StopIteration):
    next(it)
  it.close()


def test_prefetch_to_device_reraises_errors():
  def gen():
    yield 1
    raise RuntimeError("decode failed")

  it = pipeline.prefetch_to_device(gen(), lambda x: x * 10, size=1)
  assert next(it) == 10
  with pytest.raises(RuntimeError, match="decode failed"):
    next(it)


def test_extract_with_prefetch_equals_without(source):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from xbm_jax.evaluation.extract import extract  # pylint: disable=g-import-not-at-top

  embed = jax.jit(lambda x: jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
  runs = [
    extract(embed, pipeline.eval_batches(source, batch_size=16, transform_cfg=TCFG), prefetch=p)
    for p in (0, 2)
  ]
  for k in ("emb", "labels", "index"):
    np.testing.assert_array_equal(runs[1][k], runs[0][k])
  assert len(runs[0]["emb"]) == len(source)
