"""train_and_evaluate end to end on a tiny prepared tfds dataset: logs, evals,
pictures, checkpoints; exact resume after a kill; non-finite stop (config errors:
test_validation.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.steps import xbm_of
from xbm_jax.train import checkpoint, loop, step as step_lib
from xbm_jax.train.errors import ConfigError
from tests.helpers.runs import logged_rows, read_log, tiny_config, tree_listing


def final_state(workdir, like_config):
  ck = checkpoint.Checkpointer(workdir)
  raw = ck.last.restore(ck.latest_step())
  ck.close()
  return raw["state"]


@pytest.mark.slow
def test_end_to_end_logs_evals_pictures_checkpoints(data_dir, tmp_path):
  wd = str(tmp_path / "run")
  out = loop.train_and_evaluate(tiny_config(data_dir), wd)
  log = read_log(wd)
  # The returned metrics are the logged ones; every one of the 6 x 5 test images is
  # a query (each has 4 same-class images).
  ev = [l for l in log if "eval/tiny/recall@1" in l]
  assert [l["step"] for l in ev] == [6]
  assert out["eval/tiny/recall@1"] == ev[0]["eval/tiny/recall@1"]
  assert ev[0]["eval/tiny/num_queries"] == 30
  train_lines = [l for l in log if "train/loss" in l]
  # Logged every 2 steps, and at each checkpoint (3), where finiteness is checked.
  assert [l["step"] for l in train_lines] == [2, 3, 4, 6]
  for key in (
    "train/loss_batch",
    "train/loss_xbm",
    "train/memory_fill",
    "train/lr",
    "train/grad_norm",
    "train/images_per_s",
    "train/batch/pos_pairs",
  ):
    assert key in train_lines[-1], key
  # Counting updates by hand (1-based, as the reference's `iteration`): start_step=2
  # means `iteration > 2`, so updates 3, 4, 5 and 6 each enqueue the global batch of
  # 16 into 64 slots; updates 1 and 2 leave the memory empty.
  fills = {l["step"]: l["train/memory_fill"] for l in train_lines}
  assert fills == pytest.approx({2: 0.0, 3: 16 / 64, 4: 32 / 64, 6: 64 / 64})
  assert train_lines[0]["train/xbm_weight"] == 0.0
  # Drift every 2 updates at lags 2 and 4, each reading logged at the step it measured
  # (after 2 updates: lag 2; after 4 and 6: lags 2 and 4), not at the next log line.
  assert {l["step"] for l in log if "train/drift@2" in l} == {2, 4, 6}
  assert {l["step"] for l in log if "train/drift@4" in l} == {4, 6}
  assert os.path.exists(os.path.join(wd, "pictures", "retrieval_tiny_0000006.png"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(wd))
  with open(os.path.join(wd, "config.json")) as f:
    saved = json.load(f)  # the run's own config, overrides included
  assert saved["input"]["dataset"] == "tiny" and saved["model"]["embed_dim"] == 8
  assert sorted(os.listdir(os.path.join(wd, "checkpoints", "last"))) == ["3", "6"]
  # The report reads the logs of a real (smoke) run.
  from xbm_jax.insight import report

  paths = report.build_report([wd], str(tmp_path / "report"))
  for kind in ("loss", "recall", "drift"):
    assert os.path.getsize(paths[kind]) > 0, kind
  assert "eval/tiny/recall@1" in open(paths["table"]).read()


# The reference, and the memory's drift corrections (smoothed moments and a momentum
# encoder in the state).
DRIFT_CORRECTED = {
  "xbm.drift_correction": "moments",
  "xbm.moments_ema": 0.5,
  "xbm.memory_sharding": "sharded",
  "xbm.momentum_encoder": 0.5,
}


# Head re-projection: the memory holds pooled features (another shape), pre-filled
# with them; it stores the image ids of its entries (self-exclusion by id).
REPROJECTED = {
  "xbm.reprojection": True,
  "xbm.memory_sharding": "sharded",
  "xbm.prefill": True,
  "loss.kwargs.self_exclusion": "id",
}


@pytest.mark.slow
@pytest.mark.parametrize(
  "options",
  [{}, DRIFT_CORRECTED, REPROJECTED],
  ids=["reference", "drift_corrected", "reprojected"],
)
def test_killed_run_resumes_exactly(data_dir, tmp_path, monkeypatch, options):
  """Killed during update 4, after the checkpoint of step 2 (a drift step: the
  reading of step 2 was logged before the kill), the resumed run ends with the
  uninterrupted run's state and log: every row once, none lost."""
  cfg = tiny_config(data_dir, **{"pictures.enabled": False, "train.checkpoint_every": 2, **options})
  wd_full, wd_kill = str(tmp_path / "full"), str(tmp_path / "killed")
  loop.train_and_evaluate(cfg, wd_full)

  real = step_lib.make_train_step
  calls = {"n": 0}

  def dying(**kw):
    fn = real(**kw)

    def wrapped(*a):
      calls["n"] += 1
      if calls["n"] == 4:  # killed during update 4, after the checkpoint at step 2
        raise KeyboardInterrupt
      return fn(*a)

    return wrapped

  monkeypatch.setattr(step_lib, "make_train_step", dying)
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(cfg, wd_kill)
  assert (2, "train/drift@2") in logged_rows(wd_kill)
  monkeypatch.setattr(step_lib, "make_train_step", real)
  loop.train_and_evaluate(cfg, wd_kill)

  a, b = final_state(wd_full, cfg), final_state(wd_kill, cfg)
  # The smoothed moments and the momentum encoder are saved.
  corrected = options is DRIFT_CORRECTED
  assert (a["moments"] is not None) == (b["key_encoder"] is not None) == corrected
  if options is REPROJECTED:  # the pooled features of the width-4 ResNet (8 x 4 = 32)
    assert np.shape(b["memory"]["emb"])[1] != cfg.model.embed_dim
    assert_ids_name_the_entries_images(b["memory"], cfg)  # saved and restored
  else:
    assert b["memory"].get("ids") is None
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
  full, kill = logged_rows(wd_full), logged_rows(wd_kill)
  assert kill.keys() == full.keys()
  assert {s for s, k in full if k == "train/drift@2"} == {2, 4, 6}
  for key in full:
    assert kill[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key


def assert_ids_name_the_entries_images(mem, cfg):
  """Every valid entry's image id is a record index of the train split holding its
  label (prefilled and enqueued entries alike: one index space)."""
  from xbm_jax.train import setup  # pylint: disable=g-import-not-at-top

  labels = np.asarray(setup.load_source(cfg.input, cfg.input.train_split).labels)
  valid = np.asarray(mem["valid"])
  ids = np.asarray(mem["ids"])[valid]
  assert valid.any() and ids.min() >= 0 and ids.max() < len(labels)
  np.testing.assert_array_equal(labels[ids], np.asarray(mem["labels"])[valid])


def open_paths_under(root):
  """Paths under `root` this process holds open (its file descriptors)."""
  out = []
  for fd in os.listdir("/proc/self/fd"):
    try:
      target = os.readlink(os.path.join("/proc/self/fd", fd))
    except OSError:
      continue  # closed while listing
    if target.startswith(str(root)):
      out.append(target)
  return out


def test_an_exception_mid_run_closes_everything(data_dir, tmp_path, monkeypatch):
  """An error at step 2 (after the writer, checkpointer, lock and pipeline are
  open) must leave no file of the workdir open, the lock free and no prefetch
  thread running."""
  from xbm_jax.data import pipeline
  from xbm_jax.train import guards

  cfg = tiny_config(data_dir, **{"drift.enabled": False, "pictures.enabled": False})
  wd = tmp_path / "boom"
  real = step_lib.make_train_step

  def failing(**kw):
    fn = real(**kw)
    calls = []

    def wrapped(*a):
      calls.append(1)
      if len(calls) == 2:
        raise RuntimeError("boom")
      return fn(*a)

    return wrapped

  monkeypatch.setattr(step_lib, "make_train_step", failing)
  with pytest.raises(RuntimeError, match="boom"):
    loop.train_and_evaluate(cfg, str(wd))
  assert os.path.exists(wd / "metrics.jsonl")  # the writer had opened its files
  assert open_paths_under(wd) == []
  guards.WorkdirLock(str(wd)).acquire().release()  # raises WorkdirLockedError if held
  import threading

  fills = [
    t
    for t in threading.enumerate()
    if getattr(t, "_target", None) is not None
    and getattr(t._target, "__self__", None).__class__ is pipeline.DevicePrefetch
  ]
  assert fills == []


def test_non_finite_loss_stops_with_step_and_keeps_last_good(data_dir, tmp_path, monkeypatch):
  real = step_lib.make_train_step

  def poisoned(**kw):
    fn = real(**kw)

    def wrapped(state, batch, ctrl):
      step = int(jax.device_get(state.step))  # read before the state is donated
      new, metrics = fn(state, batch, ctrl)
      if step == 3:  # the 4th step (index 3)
        metrics = dict(metrics, loss=metrics["loss"] * np.nan)
      return new, metrics

    return wrapped

  monkeypatch.setattr(step_lib, "make_train_step", poisoned)
  wd = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match="step 3.*checkpoint is step 3"):
    loop.train_and_evaluate(tiny_config(data_dir), wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints", "last"))) == ["3"]


@pytest.mark.slow
def test_a_run_with_gradient_accumulation_is_two_micro_steps(data_dir, tmp_path):
  """train.accumulate=2 on 2 devices (8 rows each, two micro-batches of one class per
  device), parameters frozen (lr 0): the loop's first loss is the mean of two plain
  steps on the micro-batches (each device's rows 0-3, then 4-7, the memory and BN
  statistics carried over), and not the loss of one step on the whole batch (what
  an ignored `accumulate` would give)."""
  import contextlib

  from xbm_jax import parallel
  from xbm_jax.train import optim, setup

  frozen = {"optim.lr": 0.0, "optim.weight_decay": 0.0, "xbm.start_step": 0}
  over = {"train.num_devices": 2, "train.steps": 1, "drift.enabled": False, **frozen}
  cfg = tiny_config(data_dir, **over, **{"pictures.enabled": False, "train.accumulate": 2})
  logged = loop.train_and_evaluate(cfg, str(tmp_path / "acc"))["train/loss"]

  mesh = parallel.make_mesh(2)
  src = setup.load_source(cfg.input, "train")
  model, direction, state, _, _ = loop._build_state(cfg, mesh, src)
  with contextlib.ExitStack() as stack:  # the batch the run drew first
    big = jax.device_get(next(loop._pipeline(cfg, src, mesh, None, stack)))
  plain = step_lib.make_train_step(
    model=model,
    direction=direction,
    schedule=optim.make_schedule(cfg.optim, 1),
    xbm=xbm_of(state.memory, loss=cfg.loss.name),
    mesh=mesh,
  )
  ctrl = {"start_step": np.int32(0), "xbm_weight": np.float32(1.0), "lr_scale": np.float32(1.0)}
  rows = lambda i: np.concatenate([np.arange(d * 8 + i * 4, d * 8 + i * 4 + 4) for d in (0, 1)])
  whole = plain(jax.tree.map(jnp.copy, state), parallel.global_batch(big, mesh), ctrl)[1]["loss"]
  losses = []
  for i in (0, 1):
    micro = {k: v[rows(i)] for k, v in big.items()}
    state, m = plain(state, parallel.global_batch(micro, mesh), ctrl)
    losses.append(float(m["loss"]))
  assert logged == pytest.approx(np.mean(losses), rel=1e-5)
  assert abs(logged - float(whole)) > 1e-3 * abs(float(whole))


@pytest.mark.slow
def test_warm_start_takes_params_from_another_run(data_dir, tmp_path):
  """Warm start and export read the source run's params and BN statistics only
  (the memory, 64 x 8, differs from the warm run's 32 x 8) and leave its workdir as
  it was."""
  src = str(tmp_path / "src")
  loop.train_and_evaluate(tiny_config(data_dir, **{"drift.enabled": False}), src)
  before = tree_listing(src)
  cfg = tiny_config(
    data_dir,
    **{
      "train.steps": 1,
      "train.init_from": src,
      "optim.lr": 0.0,
      "optim.weight_decay": 0.0,
      "xbm.size": 32,
      "xbm.momentum_encoder": 0.5,
      "drift.enabled": False,
      "pictures.enabled": False,
    },
  )
  wd = str(tmp_path / "warm")
  loop.train_and_evaluate(cfg, wd)  # lr 0: params stay the source's
  a, b = final_state(src, None), final_state(wd, None)
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
  # The momentum encoder starts as a copy of the warm-started params (and so stays).
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["key_encoder"]["params"])
  step, read = checkpoint.read_params(src)  # against the whole state restored
  assert step == 6 and sorted(read) == ["batch_stats", "params"]
  jax.tree.map(np.testing.assert_array_equal, read, {k: a[k] for k in read})
  # The same through an exported .msgpack file.
  exported = str(tmp_path / "warm.msgpack")
  assert checkpoint.export_params(src, exported) == 6
  assert tree_listing(src) == before  # read-only on another run's directory
  cfg.train.init_from = exported
  wd2 = str(tmp_path / "warm2")
  loop.train_and_evaluate(cfg, wd2)
  jax.tree.map(np.testing.assert_array_equal, a["params"], final_state(wd2, None)["params"])
  # A source that does not fit this model: one line, nothing written but the lock.
  cfg.model.embed_dim = 16
  with pytest.raises(ConfigError, match="init_from=.*do not match this model"):
    loop.train_and_evaluate(cfg, str(tmp_path / "misfit"))
  assert os.listdir(tmp_path / "misfit") == [".lock"]


@pytest.mark.slow
def test_sharded_memory_run_equals_replicated_and_resumes_on_fewer_devices(data_dir, tmp_path):
  """Also with self-exclusion by image id: the ids are stored, re-laid and kept."""
  base = {
    "drift.enabled": False,
    "pictures.enabled": False,
    "train.log_every": 1,
    "xbm.memory_loss_kwargs.self_exclusion": "id",
  }
  rep = str(tmp_path / "rep")
  loop.train_and_evaluate(tiny_config(data_dir, **base), rep)
  shd = str(tmp_path / "shd")
  loop.train_and_evaluate(tiny_config(data_dir, **base, **{"xbm.memory_sharding": "sharded"}), shd)
  # 2 rows per device per step divide the 8-row shards: the same entries, so the
  # permutation-invariant losses agree step by step.
  a = {l["step"]: l for l in read_log(rep) if "train/loss" in l}
  b = {l["step"]: l for l in read_log(shd) if "train/loss" in l}
  for s in a:
    assert b[s]["train/loss"] == pytest.approx(a[s]["train/loss"], rel=1e-5), s
    assert b[s]["train/loss_xbm"] == pytest.approx(a[s]["train/loss_xbm"], rel=1e-5), s
  # Continue the sharded run on 4 devices: the memory is re-laid, nothing is lost.
  more = tiny_config(
    data_dir, **base, **{"xbm.memory_sharding": "sharded", "train.num_devices": 4, "train.steps": 7}
  )
  loop.train_and_evaluate(more, shd)
  st = final_state(shd, None)
  assert st["memory"]["ptr"].shape == (4,)
  assert int(np.sum(st["memory"]["valid"])) == 64  # 48 before + 16 from step 7
  assert_ids_name_the_entries_images(st["memory"], more)


@pytest.mark.slow
def test_prefill_fills_the_memory_from_the_model_at_the_start(data_dir, tmp_path):
  """With prefill, the memory is full from its first active step: 64 eval-mode
  embeddings of training images (the tiny set has 72), then the step enqueues."""
  cfg = tiny_config(
    data_dir,
    **{
      "xbm.prefill": True,
      "drift.enabled": False,
      "pictures.enabled": False,
      "train.log_every": 1,
      "optim.lr": 0.0,
      "optim.weight_decay": 0.0,
    },
  )
  wd = str(tmp_path / "prefill")
  loop.train_and_evaluate(cfg, wd)
  fills = {l["step"]: l["train/memory_fill"] for l in read_log(wd) if "train/loss" in l}
  assert fills[2] == 0.0 and fills[3] == 1.0  # prefilled before update 3, the first active
  st = final_state(wd, None)
  mem_emb = np.asarray(st["memory"]["emb"], np.float64)
  np.testing.assert_allclose(np.linalg.norm(mem_emb, axis=1), 1.0, rtol=1e-5)


def test_drift_of_the_model_is_zero_unchanged_and_grows_with_perturbation(data_dir):
  from xbm_jax import parallel
  from xbm_jax.data import sources
  from xbm_jax.insight import drift
  from xbm_jax.train import setup
  from xbm_jax.train import eval_runner as evaluation
  from xbm_jax.train.metrics_writer import MetricWriter

  cfg = tiny_config(data_dir)
  mesh = parallel.make_mesh()
  model, variables = setup.init_model(cfg, 3, jax.random.PRNGKey(0))
  src = sources.load("tiny", "train", data_dir)
  runner = evaluation.EvalRunner(
    cfg, model, mesh, train_src=src, writer=MetricWriter("/tmp", enabled=False), workdir="/tmp"
  )

  class S:  # the two fields embed_probe reads
    def __init__(self, params):
      self.params, self.batch_stats = params, variables["batch_stats"]

  base = runner.embed_probe(S(variables["params"]))
  assert drift.mean_cosine_drift(base, runner.embed_probe(S(variables["params"]))) == 0.0
  values = []
  for scale in (1e-3, 1e-2, 1e-1):
    noisy = jax.tree.map(
      lambda p: p + scale * np.random.default_rng(0).normal(size=p.shape).astype(p.dtype),
      variables["params"],
    )
    values.append(drift.mean_cosine_drift(base, runner.embed_probe(S(noisy))))
  assert 0 < values[0] < values[1] < values[2]


@pytest.mark.slow
def test_each_drift_reading_reaches_the_controller_once(data_dir, tmp_path, monkeypatch):
  """Back-off acts per reading: a stale reading fed on every step would compound it."""
  from xbm_jax.control import controller as controller_lib

  seen = []
  real = controller_lib.MemoryController.update

  def spy(self, step, drift=None):
    if drift:
      seen.append(step)
    return real(self, step, drift)

  monkeypatch.setattr(controller_lib.MemoryController, "update", spy)
  loop.train_and_evaluate(
    tiny_config(data_dir, **{"pictures.enabled": False}), str(tmp_path / "spy")
  )
  # drift.interval = 2 with deltas (2, 4): readings after updates 2, 4 and 6.
  assert seen == [2, 4, 6]
