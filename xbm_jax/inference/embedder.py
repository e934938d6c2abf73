"""A trained model applied exactly as evaluation applies it.

    emb = Embedder.load("/tmp/xbm_mydata")          # a workdir: config.json + checkpoint
    emb = Embedder.load("run.msgpack", config="/tmp/xbm_mydata/config.json")
    out = emb.embed_source(sources.folder("photos/"))  # {"emb": [N, D], "labels", "index"}

Same path as `xbm_jax.train.eval_runner.EvalRunner`: the config's eval transform
(resize shorter side, centre crop) in `pipeline.eval_batches`, the model built by
`models.create(config.model, axis_name="data")` (so `model.dtype: auto` is bfloat16 on
GPU/TPU, float32 on CPU, as in training), eval-mode BatchNorm (running statistics),
the head's L2 normalisation, `step.make_embed_fn` data-parallel over all local devices,
and `extract` collecting the rows. Single process (one host).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
import tqdm

from xbm_jax import models, parallel
from xbm_jax.data import pipeline, transforms
from xbm_jax.evaluation.extract import extract
from xbm_jax.train import checkpoint, step as step_lib
from xbm_jax.train.errors import ConfigError, DataError


def read_config(path: str) -> ml_collections.ConfigDict:
  """The run's config from a workdir or a `config.json` file."""
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise DataError(f"{path}: no config.json (is it a training workdir?)")
  try:
    with open(file) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise DataError(f"{file}: not a readable config.json ({e})") from e


def read_variables(path: str) -> tuple[int, dict]:
  """`(step, {"params", "batch_stats"})` of a workdir's latest checkpoint or of an
  exported `.msgpack` (scripts/export_params.py), as host arrays."""
  if os.path.isdir(path):
    try:
      return checkpoint.read_params(path)
    except FileNotFoundError as e:
      raise DataError(f"workdir {path} has no checkpoint (no checkpoints/last/<step>)") from e
  if not os.path.isfile(path):
    raise DataError(f"--model {path}: no such workdir or params file")
  try:
    raw = checkpoint.load_params(path)
  except Exception as e:  # msgpack raises assorted types on a foreign file
    raise DataError(f"{path}: not a params file from export_params.py ({e})") from e
  if not all(k in raw for k in checkpoint.PARAM_KEYS):
    raise DataError(f"{path}: params file lacks {list(checkpoint.PARAM_KEYS)}")
  return int(np.asarray(raw.get("step", -1))), {k: raw[k] for k in checkpoint.PARAM_KEYS}


class Embedder:
  """Images -> `[N, D]` float32 unit rows with a trained model (see module doc).

  Attributes:
    config: the run's config (ConfigDict). model: the Flax module. variables:
    `{"params", "batch_stats"}` replicated over the mesh. step: the checkpoint's step.
    dim: D. channels: the model's input channels (3, or 1 for a grayscale model). mesh:
    the 1-D data mesh over all local devices. tcfg: the eval transform. batch_size:
    images per batch over all devices (the config's eval batch size, rounded up to a
    multiple of the devices).
  """

  def __init__(self, config, variables: dict, *, step: int = -1, batch_size: Optional[int] = None):
    self.config, self.step = config, step
    try:
      self.model = models.create(config.model, axis_name=parallel.DATA_AXIS)
    except ValueError as e:
      raise ConfigError(f"config.model: {e}") from e
    self.tcfg = transforms.TransformConfig.from_config(config.input.transform)
    self._check_fits(variables)
    self.mesh = parallel.make_mesh()
    b = int(batch_size or config.input.eval_batch_size)
    self.batch_size = -(-b // self.mesh.size) * self.mesh.size
    self.variables = jax.device_put(
      jax.tree.map(np.asarray, variables),
      jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()),
    )
    self.dim = int(variables["params"]["head"]["fc"]["kernel"].shape[1])
    self._embed = step_lib.make_embed_fn(self.model, self.mesh)

  @classmethod
  def load(cls, path: str, *, config: Optional[str] = None, batch_size: Optional[int] = None):
    """From a workdir (its config.json and latest checkpoint), or from an exported
    `.msgpack` with `config` (a workdir or config.json) naming its model."""
    if not os.path.isdir(path) and config is None:
      raise DataError(f"--model {path} is not a workdir: also pass --config (its config.json)")
    cfg = read_config(config or path)
    step, variables = read_variables(path)
    return cls(cfg, variables, step=step, batch_size=batch_size)

  def _check_fits(self, variables: dict) -> None:
    """A params file of another model (another embed_dim, backbone): one line naming the
    first leaf that differs, before anything is embedded. Also sets `channels` (3, or 1
    for a grayscale model such as the glyph demo's) from the saved input convolution."""
    crop = self.tcfg.crop

    def shapes(channels):
      dummy = jax.ShapeDtypeStruct((1, crop, crop, channels), np.uint8)
      return jax.eval_shape(lambda x: self.model.init(jax.random.key(0), x), dummy)

    rgb, gray = shapes(3), shapes(1)
    self.channels = 3
    flat = jax.tree_util.tree_leaves_with_path(variables.get("params", {}))
    saved = {jax.tree_util.keystr(k): np.shape(v) for k, v in flat}
    for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(rgb["params"]), jax.tree.leaves(gray["params"])
    ):
      if a.shape != b.shape:  # the input convolution: its in-channels are the image's
        if saved.get(jax.tree_util.keystr(path)) == b.shape:
          self.channels, rgb = 1, gray
        break
    for key in checkpoint.PARAM_KEYS:
      misfit = checkpoint._misfit(rgb.get(key, {}), variables.get(key, {}))  # pylint: disable=protected-access
      if misfit:
        raise ConfigError(f"the saved {key} do not match config.model ({misfit})")

  def embed_fn(self, images):
    """Host uint8 `[b, crop, crop, C]` (b a multiple of the devices) -> device `[b, D]`:
    evaluation's own embed function."""
    x = parallel.global_batch({"image": images}, self.mesh)["image"]
    return self._embed(self.variables, x)

  def embed_source(self, source, *, progress: bool = False, worker_count=0) -> dict:
    """Every record of a source (`len`, `[i] -> {"image", "label"}`), transformed and
    embedded as evaluation does. Returns `extract`'s `dict(emb=float32 [N, D],
    labels=int64 [N], index=int64 [N])` in source order."""
    parts = list(self.embed_parts(source, progress=progress, worker_count=worker_count))
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def embed_parts(self, source, *, part_rows: int = 0, progress: bool = False, worker_count=0):
    """`embed_source` in parts of about `part_rows` records (0: one part), yielded in
    order with `index` counted over the whole source: a caller that stores each part
    never holds the embeddings twice. One progress bar (with ETA) over all of them."""
    n = len(source)
    if n == 0:
      raise DataError("nothing to embed: the source is empty")
    step = n if part_rows <= 0 else max(1, part_rows // self.batch_size) * self.batch_size
    bar = tqdm.tqdm(
      total=-(-n // self.batch_size), unit="batch", desc="embed", disable=not progress
    )
    try:
      for lo in range(0, n, step):
        part = _Slice(source, lo, min(n, lo + step))
        batches = pipeline.eval_batches(
          part, batch_size=self.batch_size, transform_cfg=self.tcfg, worker_count=worker_count
        )
        out = extract(self.embed_fn, _counted(batches, bar), across_processes=False)
        out["index"] = out["index"] + lo
        yield out
    finally:
      bar.close()

  def embed_images(self, images) -> np.ndarray:
    """uint8 `[N, H, W, C]` (or a list of such arrays of any size) -> `[N, D]` float32:
    the eval transform applied to each, then the model."""
    recs = [
      {"image": np.asarray(im, np.uint8), "label": -1, "index": i} for i, im in enumerate(images)
    ]
    return self.embed_source(recs)["emb"]


def _counted(batches, bar):
  for b in batches:
    yield b
    bar.update(1)


class _Slice:
  """Records `lo..hi-1` of a source, as a source."""

  def __init__(self, source, lo: int, hi: int):
    self.source, self.lo, self.hi = source, lo, hi

  def __len__(self) -> int:
    return self.hi - self.lo

  def __getitem__(self, i: int):
    return self.source[self.lo + int(i)]
