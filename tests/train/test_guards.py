"""Runs that must not end "successfully" with wrong results (issue 12): NaN weights,
two runs on one workdir, a resume with another config, an invalid enumerated value,
unexpanded paths, and a silent collapse."""

import json
import logging
import math
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.runs import read_log, tiny_config, tree_listing
from tests.helpers.steps import build, ctrl_of, make_batches
from xbm_jax import parallel
from xbm_jax.train import config as config_lib, guards, loop, validation
from xbm_jax.train import eval_runner as evaluation
from xbm_jax.train import step as step_lib
from xbm_jax.train.errors import ConfigError, NonFiniteError, ResumeError, WorkdirLockedError


QUICK = {"drift.enabled": False, "pictures.enabled": False}


# --- 1. NaN weights are never reported as a model -------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["contrastive", "multi_similarity"])
def test_huge_lr_stops_the_run_instead_of_reporting_a_perfect_model(data_dir, tmp_path, loss):
  """lr=1e30 makes the weights NaN while the loss still reads 0 (every pair mask is
  False on NaN); the run used to finish with R@1 = 1.0 and keep it as the best."""
  wd = tmp_path / "nan"
  cfg = tiny_config(
    data_dir, **{"optim.lr": 1e30, "loss.name": loss, "train.best_metric": "eval/sop/recall@1"}
  )
  with pytest.raises(NonFiniteError, match=r"at step \d"):
    loop.train_and_evaluate(cfg, str(wd))
  assert not any(k.startswith("eval/") for line in read_log(str(wd)) for k in line)
  assert not os.listdir(wd / "checkpoints" / "best")


@pytest.mark.slow
def test_step_flags_nan_params_even_when_the_loss_is_finite():
  """The oracle: NaN planted in one parameter array. The flag must say so, whatever
  the loss reads; the same step on clean params says finite."""
  mesh = parallel.make_mesh(1)
  batch = make_batches(1)[0]
  st, train_step = build(mesh, batch)
  _, clean = train_step(st, parallel.global_batch(batch, mesh), ctrl_of(1))
  assert float(clean["nonfinite"]) == 0.0
  st, train_step = build(mesh, batch)
  leaves, tree = jax.tree.flatten(st.params)
  leaves[-1] = leaves[-1].at[0].set(jnp.nan)  # the last Dense's bias
  st = st.replace(params=jax.tree.unflatten(tree, leaves))
  _, bad = train_step(st, parallel.global_batch(batch, mesh), ctrl_of(1))
  assert float(bad["nonfinite"]) == 1.0


def test_evaluation_refuses_non_finite_embeddings():
  out = {"emb": np.array([[1.0, 0.0], [np.nan, 0.0], [0.0, np.inf]], np.float32)}
  with pytest.raises(NonFiniteError, match=r"2 of 3 embeddings of split 'test'"):
    evaluation.check_finite(out, "test", 7)
  ok = {"emb": np.eye(2, dtype=np.float32)}
  assert evaluation.check_finite(ok, "test", 7) is ok


# --- 2. one live run per workdir ---------------------------------------------------


def test_a_second_run_on_a_held_workdir_fails_naming_the_holder(data_dir, tmp_path):
  wd = str(tmp_path / "busy")
  with guards.WorkdirLock(wd):
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
      loop.train_and_evaluate(tiny_config(data_dir, **QUICK), wd)
  assert not os.path.exists(os.path.join(wd, "checkpoints"))
  assert not os.path.exists(os.path.join(wd, "metrics.jsonl"))


@pytest.mark.slow
def test_the_lock_of_a_killed_run_does_not_block(tmp_path):
  wd = str(tmp_path / "stale")
  code = (
    "import os, signal, sys; from xbm_jax.train import guards; "
    "guards.WorkdirLock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)"
  )
  proc = subprocess.Popen([sys.executable, "-c", code, wd])
  assert proc.wait() == -signal.SIGKILL
  with open(os.path.join(wd, ".lock")) as f:
    assert f"pid {proc.pid} " in f.read()  # the dead run's record is still there
  with guards.WorkdirLock(wd):
    with open(os.path.join(wd, ".lock")) as f:
      assert f"pid {os.getpid()} " in f.read()


# --- 3. a resume with another config -----------------------------------------------


@pytest.mark.slow
def test_resume_with_a_changed_config_names_the_keys(data_dir, tmp_path):
  wd = str(tmp_path / "resume")
  loop.train_and_evaluate(tiny_config(data_dir, **QUICK), wd)
  saved = open(os.path.join(wd, "config.json")).read()
  unlocked = lambda: {p: v for p, v in tree_listing(wd).items() if ".lock" not in p}
  before = unlocked()
  for key, value in (("xbm.size", 32), ("model.embed_dim", 16), ("xbm.dtype", "bfloat16")):
    with pytest.raises(ResumeError) as err:
      loop.train_and_evaluate(tiny_config(data_dir, **QUICK, **{key: value}), wd)
    msg = str(err.value)
    assert key in msg and "\n" not in msg and "strict" not in msg, msg
  with pytest.raises(ResumeError, match="loss.name.*allow_config_change") as err:
    loop.train_and_evaluate(
      tiny_config(data_dir, **QUICK, **{"loss.name": "multi_similarity", "optim.lr": 2e-3}), wd
    )
  assert "optim.lr" in str(err.value)
  assert open(os.path.join(wd, "config.json")).read() == saved  # nothing overwritten
  assert unlocked() == before  # refused before the checkpoint manager or the writer opened
  # Explicitly allowed: resumes (one more step), logs the change, keeps the old config.
  loop.train_and_evaluate(
    tiny_config(
      data_dir,
      **QUICK,
      **{"loss.name": "multi_similarity", "train.steps": 7, "train.allow_config_change": True},
    ),
    wd,
  )
  assert json.load(open(os.path.join(wd, "config.json")))["loss"]["name"] == "multi_similarity"
  assert json.load(open(os.path.join(wd, "config.step6.json")))["loss"]["name"] == "contrastive"
  assert [l["step"] for l in read_log(wd) if "train/loss" in l][-1] == 7


def test_config_diff_against_a_hand_made_pair():
  saved = {"a": 1, "b": {"c": [1, 2], "d": "x"}}
  now = {"a": 1, "b": {"c": [1, 3], "e": 0}}
  assert guards.config_diff(saved, now) == {
    "b.c": ([1, 2], [1, 3]),
    "b.d": ("x", None),
    "b.e": (None, 0),
  }


def test_turning_a_stateful_option_on_or_off_is_refused_on_resume():
  """The momentum encoder, the smoothed moments and the feature memory of head
  re-projection (another shape) live in the train state only while on: turning one on (or off) cannot restore, even when changes are allowed;
  another nonzero value can. So do the memory's image ids (self_exclusion="id")."""
  saved = guards.config_json(config_lib.base())
  for key in ("moments_ema", "momentum_encoder", "reprojection"):
    on = guards.config_json(config_lib.base())
    on["xbm"][key] = True if key == "reprojection" else 0.5
    if key == "moments_ema":
      on["xbm"]["drift_correction"] = "moments"
    for a, b in ((saved, on), (on, saved)):
      with pytest.raises(ResumeError, match=f"xbm.{key} .* changes the saved state's shapes"):
        guards.check_resume(a, b, allow_change=True)
    if key == "reprojection":  # a bool: no other "on" value
      continue
    more = guards.config_json(config_lib.base())
    more["xbm"].update(on["xbm"])
    more["xbm"][key] = 0.9
    assert f"xbm.{key}" in guards.check_resume(on, more, allow_change=True)
  # The image ids the memory stores for self_exclusion="id" (memory term) are a leaf too.
  ids = guards.config_json(config_lib.base())
  ids["xbm"]["memory_loss_kwargs"]["self_exclusion"] = "id"
  for a, b in ((saved, ids), (ids, saved)):
    with pytest.raises(ResumeError, match="self_exclusion .* changes the saved state's shapes"):
      guards.check_resume(a, b, allow_change=True)
  other = guards.config_json(config_lib.base())
  other["loss"]["kwargs"]["self_exclusion"] = "index"
  assert "loss.kwargs.self_exclusion" in guards.check_resume(saved, other, allow_change=True)


# --- 4. every enumerated value is checked before training --------------------------


@pytest.mark.parametrize(
  "key,value,valid",
  [
    ("xbm.dtype", "float16", "bfloat16"),
    ("xbm.memory_sharding", "striped", "sharded"),
    ("loss.name", "arcface", "multi_similarity"),
    ("optim.name", "lamb", "adamw"),
    ("optim.schedule", "linear", "cosine"),
    ("model.name", "vit", "resnet50"),
    ("model.pool", "mean", "gem"),
    ("loss.kwargs.reduction", "sum", "paper"),
    ("xbm.memory_loss_kwargs.self_exclusion", "all", "similarity"),
    ("train.best_metric", "eval/cub/recall@1", "tiny"),
  ],
)
def test_invalid_enumerated_value_fails_before_anything_runs(data_dir, tmp_path, key, value, valid):
  wd = tmp_path / "enum"
  with pytest.raises(ConfigError, match=valid) as err:
    loop.train_and_evaluate(tiny_config(data_dir, **{key: value}), str(wd))
  assert f"config.{key}={value!r}" in str(err.value)
  assert not wd.exists()  # before the lock, the data, the model


def test_every_enumerated_default_is_valid():
  from xbm_jax.train import config as config_lib

  validation.check_enumerated(config_lib.base())  # the oracle: base() must pass its own check


# --- 5. paths as the user wrote them ---------------------------------------------


@pytest.mark.slow
def test_tilde_and_env_vars_are_expanded_in_paths(data_dir, tmp_path, monkeypatch):
  home = str(tmp_path / "home")
  os.makedirs(home)
  monkeypatch.setenv("HOME", home)
  monkeypatch.setenv("XBM_TEST_DATA", os.path.dirname(data_dir))
  cfg = tiny_config(
    data_dir,
    **QUICK,
    **{"train.steps": 2, "input.data_dir": "$XBM_TEST_DATA/" + os.path.basename(data_dir)},
  )
  loop.train_and_evaluate(cfg, "~/runs/x")
  assert os.path.isdir(os.path.join(home, "runs", "x", "checkpoints"))
  saved = json.load(open(os.path.join(home, "runs", "x", "config.json")))
  assert saved["input"]["data_dir"] == data_dir
  assert guards.expand_path("~/a") == os.path.join(home, "a")


# --- collapse is said, not silent --------------------------------------------------


def test_mean_pairwise_cosine_matches_a_loop_over_pairs():
  e = np.random.default_rng(0).normal(size=(7, 5))
  u = e / np.linalg.norm(e, axis=1, keepdims=True)
  pairs = [u[i] @ u[j] for i in range(7) for j in range(7) if i != j]
  assert guards.mean_pairwise_cosine(e) == pytest.approx(np.mean(pairs), abs=1e-12)
  assert guards.mean_pairwise_cosine(np.ones((4, 3))) == pytest.approx(1.0)


@pytest.mark.slow
def test_zero_gradients_and_collapsed_embeddings_are_warned(
  data_dir, tmp_path, monkeypatch, caplog
):
  from xbm_jax.train import step as step_lib

  real_step, real_probe = step_lib.make_train_step, evaluation.EvalRunner.embed_probe

  def zero_grad(**kw):
    fn = real_step(**kw)
    return lambda *a: (lambda s, m: (s, dict(m, grad_norm=m["grad_norm"] * 0)))(*fn(*a))

  def collapsed(self, state):  # every probe image embedded to the same row
    emb = real_probe(self, state)
    return np.repeat(emb[:1], len(emb), axis=0)

  monkeypatch.setattr(step_lib, "make_train_step", zero_grad)
  monkeypatch.setattr(evaluation.EvalRunner, "embed_probe", collapsed)
  with caplog.at_level(logging.WARNING, logger="xbm_jax.train"):
    loop.train_and_evaluate(
      tiny_config(data_dir, **{"pictures.enabled": False}), str(tmp_path / "collapse")
    )
  text = caplog.text
  assert "gradient norm is 0" in text and "collapsed" in text
  assert text.count("embeddings have collapsed") == 1  # said once, not per probe


# --- the drift guard stops the memory -------------------------------------------


@pytest.mark.slow
def test_the_guard_stops_enqueue_and_the_memory_term(data_dir, tmp_path, monkeypatch):
  """The probe is scripted: still before the start (rank drift 0, so the floor 0.01 is
  the reference), a fresh random set at each reading after it (rank drift near 1).
  With the memory on from update 2 (0-based) and a reading every 2 updates, the
  reading after update 4 trips the guard: updates 2 and 3 enqueue 16 rows each into
  64 slots, updates 4 and 5 nothing, and their loss is the batch term alone."""
  rng = np.random.default_rng(0)
  still = rng.normal(size=(16, 8))

  def scripted(self, state):
    done = int(jax.device_get(state.step))
    return still if done <= 2 else rng.normal(size=(16, 8))

  monkeypatch.setattr(evaluation.EvalRunner, "embed_probe", scripted)
  wd = str(tmp_path / "guard")
  cfg = tiny_config(
    data_dir, **{"pictures.enabled": False, "train.log_every": 1, "xbm.guard": True}
  )
  loop.train_and_evaluate(cfg, wd)
  rows = {l["step"]: l for l in read_log(wd) if "train/loss" in l}
  fills = {s: rows[s]["train/memory_fill"] for s in rows}
  assert fills == pytest.approx({1: 0, 2: 0, 3: 16 / 64, 4: 32 / 64, 5: 32 / 64, 6: 32 / 64})
  assert [rows[s]["train/xbm_weight"] for s in range(1, 7)] == [0, 0, 1, 1, 0, 0]
  for s in (5, 6):
    assert rows[s]["train/loss"] == pytest.approx(rows[s]["train/loss_batch"], rel=1e-6)
  assert rows[6]["train/xbm_guard_off_step"] == 4.0


def _mcnemar_p(gains: int, losses: int) -> float:
  """P(X >= losses), X ~ Binomial(gains + losses, 1/2), by counting."""
  n = gains + losses
  return sum(math.comb(n, i) for i in range(losses, n + 1)) / 2**n if n else 1.0


@pytest.mark.slow
@pytest.mark.parametrize("fires", [True, False], ids=["fires", "holds"])
def test_the_paired_guard_reads_val_hits_and_switches_the_memory_off(
  data_dir, tmp_path, monkeypatch, fires
):
  """xbm.guard="paired", memory from update 2, an evaluation every 2 updates (after 2:
  the memory-free reference; after 4 and 6: two looks at alpha / 2). The per-query
  hits are scripted on the real ones' length: the reference hits every other query,
  after the start all are missed (gains 0, losses 15: fires after update 4, memory off
  from update 4 on, and still off after a kill and resume) or hit exactly the others
  (gains = losses = 15: holds, the memory stays). The logged verdict equals a hand
  McNemar; the real hits (what the script replaces) average to the logged R@1."""
  real_hits, seen = evaluation.query_hits, []

  def scripted(evaluator, embed_split, *, k, mesh=None):
    real = real_hits(evaluator, embed_split, k=k, mesh=mesh)
    seen.append(real)
    reference = np.arange(len(real)) % 2 == 0
    if len(seen) == 1:
      return reference
    return np.zeros_like(reference) if fires else ~reference

  monkeypatch.setattr(evaluation, "query_hits", scripted)
  over = {
    **QUICK,
    "train.log_every": 1,
    "train.checkpoint_every": 2,
    "evals.sop.every_steps": 2,
    "xbm.guard": "paired",
    "xbm.guard_metric": "eval/sop/recall@1",  # renamed after the dataset with the evaluator
  }
  cfg, wd = tiny_config(data_dir, **over), str(tmp_path / "paired")
  calls, real_step = {"n": 0}, step_lib.make_train_step

  def dying(**kw):
    fn = real_step(**kw)

    def wrapped(*a):
      calls["n"] += 1
      if fires and calls["n"] == 6:  # during update 5, after the checkpoint of step 4
        raise KeyboardInterrupt
      return fn(*a)

    return wrapped

  monkeypatch.setattr(step_lib, "make_train_step", dying)
  if fires:
    with pytest.raises(KeyboardInterrupt):
      loop.train_and_evaluate(cfg, wd)
    assert len(seen) == 2
  loop.train_and_evaluate(cfg, wd)
  assert len(seen) == (2 if fires else 3)  # off: the resumed run reads no more hits
  rows = read_log(wd)
  r1 = {l["step"]: l["eval/tiny/recall@1"] for l in rows if "eval/tiny/recall@1" in l}
  for step, real in zip((2, 4, 6), seen):
    assert np.mean(real) == pytest.approx(r1[step], abs=1e-6)
  verdicts = {l["step"]: l for l in rows if "train/xbm_guard_p" in l}
  assert sorted(verdicts) == ([4] if fires else [4, 6])
  gains, losses = (0, 15) if fires else (15, 15)
  for v in verdicts.values():
    assert (v["train/xbm_guard_gains"], v["train/xbm_guard_losses"]) == (gains, losses)
    assert v["train/xbm_guard_p"] == pytest.approx(_mcnemar_p(gains, losses), rel=1e-9)
    assert v["train/xbm_guard_reference_step"] == 2
    assert (_mcnemar_p(gains, losses) < 0.01 / 2) == fires
  train = {l["step"]: l for l in rows if "train/loss" in l}
  fills = [train[s]["train/memory_fill"] for s in range(1, 7)]
  weights = [train[s]["train/xbm_weight"] for s in range(1, 7)]
  if fires:
    assert fills == pytest.approx([0, 0, 16 / 64, 32 / 64, 32 / 64, 32 / 64])
    assert weights == [0, 0, 1, 1, 0, 0]
    assert train[6]["train/xbm_guard_off_step"] == 4.0
  else:
    assert fills == pytest.approx([0, 0, 16 / 64, 32 / 64, 48 / 64, 1])
    assert weights == [0, 0, 1, 1, 1, 1]
    assert "train/xbm_guard_off_step" not in train[6]
