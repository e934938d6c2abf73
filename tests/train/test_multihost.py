"""Two processes on localhost (2 CPU devices each, gloo collectives) give the same
losses as one process with the same global batch."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(pid, nproc, port, out):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen([sys.executable, WORKER, str(pid), str(nproc), str(port), out],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  port = free_port()
  outs = [str(tmp_path / f"p{i}.json") for i in range(2)]
  procs = [launch(i, 2, port, outs[i]) for i in range(2)]
  single = str(tmp_path / "single.json")
  for p in procs:
    try:
      log, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("multi-process run timed out")
    assert p.returncode == 0, log.decode()[-3000:]
  # The reference: one process, 2 devices, the whole global batch.
  ref = subprocess.run([sys.executable, WORKER, "0", "1", "0", single],
                       env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
                       capture_output=True, timeout=240)
  assert ref.returncode == 0, ref.stdout.decode()[-3000:] + ref.stderr.decode()[-3000:]
  got = [json.load(open(o)) for o in outs]
  want = json.load(open(single))
  assert got[0]["devices"] == 4 and want["devices"] == 2
  np.testing.assert_allclose(got[0]["loss"], want["loss"], rtol=1e-5)
  np.testing.assert_allclose(got[1]["loss"], want["loss"], rtol=1e-5)
