"""One process of the two-process test (run by test_multihost.py, not by pytest).

argv: process_id num_processes port out.json. Each process has 2 CPU devices and
feeds its own half of every global batch; prints the per-step losses as JSON.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if nproc > 1:
  from xbm_jax import parallel  # noqa: E402
  parallel.initialize_distributed(coordinator_address=f"127.0.0.1:{port}",
                                  num_processes=nproc, process_id=pid)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))
from tests.train.test_step import make_batches, run_steps_local  # noqa: E402

batches = make_batches(3, seed=5)
rows = 16 // nproc
local = [{k: v[pid * rows:(pid + 1) * rows] for k, v in b.items()} for b in batches]
history = run_steps_local(local)
with open(out, "w") as f:
  json.dump({"loss": [float(h["loss"]) for h in history],
             "devices": jax.device_count()}, f)
