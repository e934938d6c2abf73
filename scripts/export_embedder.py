"""Export a run's embedder as serialized StableHLO (`jax.export`, params inside).

    python scripts/export_embedder.py --model /tmp/xbm_mydata --out embedder.jaxexp

See xbm_jax/inference/export.py for loading it with jax alone.
"""

import argparse

from xbm_jax.inference import cli


def main(argv):
  p = argparse.ArgumentParser(prog="export_embedder", description=__doc__)
  p.add_argument("--model", required=True, help="training workdir, or an exported .msgpack")
  p.add_argument("--config", help="config.json (or its workdir) for a .msgpack --model")
  p.add_argument("--out", required=True, help="artifact to write (and OUT.json)")
  p.add_argument("--platforms", default="", help="comma-separated, e.g. cpu,cuda (default: this)")
  a = p.parse_args(argv)
  from xbm_jax.inference import export  # pylint: disable=g-import-not-at-top
  from xbm_jax.inference.embedder import Embedder  # pylint: disable=g-import-not-at-top

  cli.check_writable(a.out, "--out")
  embedder = Embedder.load(a.model, config=a.config)
  platforms = tuple(x for x in a.platforms.split(",") if x) or None
  size = export.write_artifact(embedder, a.out, platforms=platforms)
  print(f"wrote {a.out} ({size} bytes) and {a.out}.json: step {embedder.step}, dim {embedder.dim}")


if __name__ == "__main__":
  cli.run_main(main)
