r"""Train XBM: `python scripts/train.py --config=configs/sop.py --workdir=/tmp/xbm_sop`.

Overrides: `--config.xbm.size=20000 --config.xbm.enabled=False ...`; variants:
`--config=configs/glyphs.py:smoke`. Multi-host: set XBM_COORDINATOR (host:port),
XBM_NUM_PROCESSES and XBM_PROCESS_ID (or pass the flags) on every host.
The run resumes automatically from the last checkpoint in --workdir.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xbm_jax import parallel  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and logs go.")
_COORD = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
_PID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")


def main(argv):
  del argv
  parallel.initialize_distributed(coordinator_address=_COORD.value,
                                  num_processes=_NPROC.value, process_id=_PID.value)
  from xbm_jax.train.loop import train_and_evaluate  # after distributed init
  metrics = train_and_evaluate(_CONFIG.value, os.path.expanduser(_WORKDIR.value))
  for k in sorted(metrics):
    if k.startswith("eval/"):
      print(f"{k} = {metrics[k]:.4f}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
