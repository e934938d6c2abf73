"""The primitives of the config checks (`validation`, `validation_xbm`): a one-line
`ConfigError` naming the key, a dotted read, the positive-int rule."""

from __future__ import annotations

from xbm_jax.train.errors import ConfigError


def fail(msg: str):
  raise ConfigError(msg)


def get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def positive(config, *keys, allow_zero: bool = False) -> None:
  for key in keys:
    value = get(config, key)
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      fail(f"config.{key}={value!r}: an int >= {low}")
