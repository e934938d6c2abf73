"""Collapse warnings after an evaluation: R@1 below chance, embeddings at a point."""

import logging

import numpy as np
import pytest

from tests.helpers.runs import tiny_config
from xbm_jax.evaluation import evaluators
from xbm_jax.train import collapse, loop


def chance_by_loop(q_labels, g_labels, leave_one_out):
  """Oracle: for each query, count the gallery items a random order ranks first
  with the query's label, one by one."""
  shares = []
  for i, label in enumerate(q_labels):
    others = [j for j in range(len(g_labels)) if not (leave_one_out and j == i)]
    shares.append(sum(g_labels[j] == label for j in others) / len(others))
  return float(np.mean(shares))


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_chance_recall_matches_counting(leave_one_out):
  rng = np.random.default_rng(0)
  g = rng.integers(0, 7, size=40)
  q = g if leave_one_out else rng.integers(0, 9, size=25)  # labels 7, 8: none in gallery
  got = collapse.chance_recall_at_1(q, g, leave_one_out=leave_one_out)
  assert got == pytest.approx(chance_by_loop(list(q), list(g), leave_one_out), abs=1e-12)


def embedded(emb, labels):
  return {"test": {"emb": np.asarray(emb, np.float32), "labels": np.asarray(labels)}}


EVALS = {"e": evaluators.create("e", {"type": "leave_one_out", "split": "test", "ks": (1,)})}


def test_warnings_name_a_point_collapse_and_a_recall_below_chance():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(10), 4)
  spread = rng.normal(size=(40, 16))
  point = np.ones((40, 16)) + 1e-3 * rng.normal(size=(40, 16))
  chance = 3 / 39  # 3 other images of each class among 39
  noise = 3 * np.sqrt(chance * (1 - chance) / 40)  # 3 std of a random order's R@1
  sane = {"eval/e/recall@1": chance - noise + 0.01}
  assert collapse.collapse_warnings(EVALS, ["e"], sane, embedded(spread, labels), 5) == []
  (w,) = collapse.collapse_warnings(EVALS, ["e"], sane, embedded(point, labels), 5)
  assert "step 5: the 'test' embeddings have collapsed to a point" in w
  below = {"eval/e/recall@1": chance - noise - 0.01}
  (w,) = collapse.collapse_warnings(EVALS, ["e"], below, embedded(spread, labels), 7)
  assert w.startswith(f"step 7: e R@1 {chance - noise - 0.01:.4f} is below chance ({chance:.4f})")


class TextWriter:
  def __init__(self):
    self.texts = []

  def write_text(self, step, name, text):
    self.texts.append((step, name, text))


def test_each_warning_goes_to_the_log_and_to_tensorboard_text(caplog):
  point = np.ones((12, 4))
  writer = TextWriter()
  with caplog.at_level(logging.WARNING, logger="xbm_jax.train"):
    got = collapse.warn_after_evaluation(
      EVALS, ["e"], {}, embedded(point, np.arange(12) % 3), 9, writer=writer
    )
  assert len(got) == 1 and [r.getMessage() for r in caplog.records] == got
  assert writer.texts == [(9, "warnings", got[0])]


@pytest.mark.slow
def test_a_huge_learning_rate_warns_in_the_log_and_tensorboard(data_dir, tmp_path, caplog):
  """lr 1e3 on the tiny set (a few seconds): every embedding ends up pointing the
  same way; the run finishes, and says so."""
  cheap = {"drift.enabled": False, "pictures.enabled": False, "train.num_devices": 1}
  cfg = tiny_config(data_dir, **{"optim.lr": 1e3, "train.steps": 2, **cheap})
  with caplog.at_level(logging.WARNING, logger="xbm_jax.train"):
    loop.train_and_evaluate(cfg, str(tmp_path / "run"))
  got = [r.getMessage() for r in caplog.records if "collapsed to a point" in r.getMessage()]
  assert len(got) == 1 and got[0].startswith("step 2: the 'test' embeddings have collapsed"), got
