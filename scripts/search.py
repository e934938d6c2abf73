"""`xbm-search`: see xbm_jax/inference/cli.py and docs/search.md (`--help` for the flags)."""

from xbm_jax.inference import cli

if __name__ == "__main__":
  cli.search()
