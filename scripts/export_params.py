"""Export a run's latest params + BN statistics to one small .msgpack file, usable as
`--config.train.init_from=FILE.msgpack` (a warm start for another run).

    python scripts/export_params.py --workdir /tmp/glyphs_base --out glyphs_warm.msgpack
"""

import argparse
import os


from xbm_jax.train import checkpoint  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  a = p.parse_args()
  step = checkpoint.export_params(a.workdir, a.out)
  print(f"exported step {step} of {a.workdir} to {a.out} ({os.path.getsize(a.out)} bytes)")


if __name__ == "__main__":
  main()
