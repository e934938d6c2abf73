"""Launching `scripts/train.py` as a pod: N processes on localhost, each with its own fake
CPU devices, gloo collectives (used by tests/train/test_pod.py and test_faults.py)."""

import os
import socket
import subprocess
import sys
import time
import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch(workdir, extra=(), *, flags, nproc=2, devices=2):
  """Starts the processes of one run of `flags` + `extra`; returns them
  (stdout+stderr to workdir/pN.log)."""
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
        [sys.executable, TRAIN, *flags, f"--workdir={workdir}", *extra],
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


def check_ok(workdir):
  for name in sorted(os.listdir(workdir)):
    if name.endswith(".log"):
      text = open(os.path.join(workdir, name)).read()
      assert "Traceback" not in text, text[-3000:]


TRAIN = os.path.join(ROOT, "scripts", "train.py")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def tail(p) -> str:
  return open(p.stdout_path).read()[-3000:]
