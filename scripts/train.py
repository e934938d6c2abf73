r"""Train XBM: `python scripts/train.py --config=configs/sop.py --workdir=/tmp/xbm_sop`.

A thin wrapper of `python -m xbm_jax.train` (see xbm_jax/train/__main__.py for the
flags): `--config.xbm.size=20000 ...` overrides, `:smoke` variants, `--verbose`.
The run resumes automatically from the last checkpoint in --workdir.
"""

from xbm_jax.train.__main__ import run

if __name__ == "__main__":
  run()
