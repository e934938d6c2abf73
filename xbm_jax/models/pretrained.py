"""`load_pretrained`: a converted backbone file (scripts/convert_weights.py) into
the variables of an `xbm_jax.models.create(...)` model. Depends on neither the
factory nor the converter, which both use it."""

from __future__ import annotations

from typing import Any, Mapping

import flax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

MAX_LISTED = 20


def listed(items) -> str:
  items = list(items)
  more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
  return "; ".join(items[:MAX_LISTED]) + more


def load_pretrained(variables: Mapping[str, Any], path: str) -> dict:
  """Replaces the backbone of `variables` (from EmbeddingModel.init) by a converted file.

  The head stays as initialised. Raises ValueError naming every key or shape of the file
  that does not match the model (e.g. a resnet18 file for a resnet50 model).
  """
  with open(path, "rb") as f:
    payload = flax.serialization.msgpack_restore(f.read())
  if not isinstance(payload, dict) or not {"params", "batch_stats"} <= set(payload):
    raise ValueError(
      f"{path}: not a converted backbone file (want keys params, "
      "batch_stats; write one with scripts/convert_weights.py)"
    )
  variables = flax.core.unfreeze(variables)
  new = dict(variables)
  for collection in ("params", "batch_stats"):
    if "backbone" not in variables.get(collection, {}):
      raise ValueError(
        f"variables[{collection!r}] has no 'backbone' entry; pass the "
        "variables of an xbm_jax.models.create(...) model"
      )
    have = traverse_util.flatten_dict(variables[collection]["backbone"], sep="/")
    got = traverse_util.flatten_dict(payload[collection], sep="/")
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in have.items() if k not in got]
    problems += [f"unexpected {k} {tuple(np.shape(v))}" for k, v in got.items() if k not in have]
    problems += [
      f"{k}: file {tuple(np.shape(got[k]))}, model {tuple(v.shape)}"
      for k, v in have.items()
      if k in got and np.shape(got[k]) != v.shape
    ]
    if problems:
      raise ValueError(
        f"{path} (arch {payload.get('arch')!r}) does not match the model's "
        f"backbone {collection}: {listed(problems)}"
      )
    loaded = {k: jnp.asarray(got[k], dtype=v.dtype) for k, v in have.items()}
    new[collection] = {
      **variables[collection],
      "backbone": traverse_util.unflatten_dict(loaded, sep="/"),
    }
  return new
