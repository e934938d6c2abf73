"""The embedder as a serving artifact: serialized StableHLO (`jax.export`), params inside.

    python scripts/export_embedder.py --model /tmp/xbm_mydata --out embedder.jaxexp

writes `embedder.jaxexp` (the serialized `jax.export.Exported`) and
`embedder.jaxexp.json` (what the caller must feed it). Loading needs jax alone:

    import jax, numpy as np
    fn = jax.export.deserialize(bytearray(open("embedder.jaxexp", "rb").read()))
    emb = fn.call(crops)   # uint8 [b, crop, crop, C] -> float32 [b, D] unit rows, any b

The function is the eval-mode forward (`model.apply(variables, x, train=False)`) with the
parameters and BN statistics as constants; its batch dimension is symbolic. Its input is
the evaluation transform's output (shorter side resized to `resize`, centre crop of
`crop`, see `xbm_jax.data.transforms.eval_transform`), which the JSON names. The compute
dtype is the config's as resolved on the exporting backend (`auto`: float32 on CPU);
`platforms` lowers for other backends (e.g. ("cpu", "cuda")).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from xbm_jax import models


def export_embedder(embedder, *, platforms: Optional[Sequence[str]] = None) -> bytes:
  """The serialized `Exported` of `embedder`'s forward (see module doc)."""
  model = models.create(embedder.config.model)  # eval mode: no BN axis needed
  variables = jax.tree.map(np.asarray, jax.device_get(embedder.variables))

  def forward(images):
    return model.apply(variables, images, train=False)

  (b,) = jax.export.symbolic_shape("b")
  crop = embedder.tcfg.crop
  spec = jax.ShapeDtypeStruct((b, crop, crop, embedder.channels), jnp.uint8)
  exp = jax.export.export(jax.jit(forward), platforms=platforms)(spec)
  return bytes(exp.serialize())


def describe(embedder) -> dict:
  """The artifact's input contract and provenance (its `.json` sidecar)."""
  t = embedder.tcfg
  return dict(
    input="uint8 [b, crop, crop, channels]: shorter side resized to `resize` (bilinear), "
    "centre crop",
    resize=t.resize,
    crop=t.crop,
    channels=embedder.channels,
    dim=embedder.dim,
    step=embedder.step,
    model=embedder.config.model.to_dict(),
  )


def _atomic_write(path: str, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(prefix=".export-", dir=os.path.dirname(os.path.abspath(path)))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_artifact(embedder, path: str, *, platforms: Optional[Sequence[str]] = None) -> int:
  """Writes `path` and `path.json` atomically; returns the artifact's size in bytes."""
  blob = export_embedder(embedder, platforms=platforms)
  _atomic_write(path, blob)
  _atomic_write(path + ".json", json.dumps(describe(embedder), indent=2).encode())
  return len(blob)
