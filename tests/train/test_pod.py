"""The real `scripts/train.py` as a pod runs it: two processes on localhost, 2 CPU
devices each, gloo collectives, with evaluation, drift probe, memory pre-fill and
checkpoints: every logged training statistic (losses, pair statistics, drift) and
every eval metric equal a one-process run on 4 devices (the same global batch).

Only what needs several processes is here; a killed run's exact resume, the sharded
memory and its re-laying on another device count are checked in-process
(test_loop.py). Each launch is a whole `scripts/train.py` (start-up and compilation
dominate), hence `slow` (CI runs it all the same).
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
STEPS = 6
# Short: 6 steps, the memory switched on and pre-filled at step 3 (moment-matched and
# fed by a momentum encoder from then on), a drift probe every 2 steps, checkpoints every 2, evaluation at the end on a 1,500-image split (its
# size divides neither the process count nor the batch: uneven host chunks, padding).
FLAGS = [
  "--config=configs/glyphs.py:smoke",
  f"--config.train.steps={STEPS}",
  "--config.train.log_every=1",
  "--config.train.checkpoint_every=2",
  "--config.xbm.prefill=True",
  # The memory's smoothed moment matching: moments combined across processes, and
  # the moving average in the train state.
  "--config.xbm.drift_correction=moments",
  "--config.xbm.moments_ema=0.5",
  # The momentum encoder (its parameters and BatchNorm statistics in the train state)
  # embeds the enqueued rows on every process.
  "--config.xbm.momentum_encoder=0.9",
  # Self-exclusion by image id: each row's id is its global record index, stored in
  # the memory (pre-filled ones too) alike on every process.
  "--config.xbm.memory_loss_kwargs.self_exclusion=id",
  "--config.evals.glyphs.split=val5",
  "--config.train.progress=False",
]
NOT_COMPARED = ("train/steps_per_s", "train/images_per_s")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, extra=(), *, nproc=2, devices=2):
  """Starts the processes of one run; returns them (stdout+stderr to workdir/pN.log)."""
  os.makedirs(workdir, exist_ok=True)
  port, procs = free_port(), []
  for pid in range(nproc):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "XBM_"))}
    env.update(
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
    )
    if nproc > 1:
      env.update(
        XBM_COORDINATOR=f"127.0.0.1:{port}", XBM_NUM_PROCESSES=str(nproc), XBM_PROCESS_ID=str(pid)
      )
    path = os.path.join(workdir, f"p{pid}.{time.time_ns()}.log")
    with open(path, "w") as log:
      p = subprocess.Popen(
        [sys.executable, TRAIN, *FLAGS, f"--workdir={workdir}", *extra],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
      )
    p.stdout_path = path
    procs.append(p)
  return procs


def wait(*runs, timeout=240):
  deadline = time.time() + timeout
  for procs in runs:
    for p in procs:
      try:
        p.wait(timeout=max(1, deadline - time.time()))
      except subprocess.TimeoutExpired:
        for q in (q for r in runs for q in r):
          q.kill()
        pytest.fail("a training process timed out")
      assert p.returncode == 0, tail(p)


def tail(p) -> str:
  return open(p.stdout_path).read()[-3000:]


def check_ok(workdir):
  for name in sorted(os.listdir(workdir)):
    if name.endswith(".log"):
      text = open(os.path.join(workdir, name)).read()
      assert "Traceback" not in text, text[-3000:]


def logged(workdir) -> dict:
  """`{(step, key): value}` of metrics.jsonl (written by process 0 only)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      step = row.pop("step")
      for k, v in row.items():
        if isinstance(v, (int, float)) and k not in NOT_COMPARED:
          assert (step, k) not in out, f"{k} logged twice at step {step}"
          out[(step, k)] = v
  return out


@pytest.mark.slow
def test_two_processes_log_what_one_process_logs(tmp_path):
  pod, one = str(tmp_path / "pod"), str(tmp_path / "one")
  wait(launch(pod), launch(one, nproc=1, devices=4))
  check_ok(pod)
  check_ok(one)
  got, want = logged(pod), logged(one)
  assert got.keys() == want.keys()
  keys = {k for _, k in want}
  assert {
    "train/loss",
    "train/xbm/mean_neg_sim",
    "train/drift@2",
    "eval/glyphs/recall@1",
    "eval/glyphs/map@r",
  } <= keys
  assert want[(STEPS, "eval/glyphs/num_queries")] > 1000  # the whole split scored
  assert want[(STEPS, "train/memory_fill")] == 1.0  # pre-filled
  for key in sorted(want):
    np.testing.assert_allclose(got[key], want[key], rtol=2e-4, atol=1e-6, err_msg=str(key))
  assert len(os.listdir(os.path.join(pod, "pictures"))) == 1
