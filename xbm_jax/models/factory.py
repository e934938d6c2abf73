"""The one place that turns a model config into a Flax module.

cfg = xbm_jax.models.default_config(); cfg.name = "bninception"; cfg.embed_dim = 512
model = xbm_jax.models.create(cfg, axis_name="data")
variables = xbm_jax.models.init_variables(model, rng, image_size=224,
                                          init_from=cfg.init_from)
emb, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from xbm_jax.models.bninception import BNInception
from xbm_jax.models.googlenet import GoogLeNet
from xbm_jax.models.head import POOLS, EmbeddingHead, global_pool
from xbm_jax.models.pretrained import load_pretrained
from xbm_jax.models.resnet import ResNet
from xbm_jax.models.small import SmallCNN

NAMES = ("resnet50", "resnet18", "bninception", "googlenet", "small_cnn")
# "auto": bfloat16 activations on GPU/TPU (their matmul units' native type; params, BN
# statistics, the head and the embeddings stay float32), float32 on CPU (bf16 is slow there).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "auto": None}
_ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def resolve_dtype(name: str, backend: Optional[str] = None) -> Any:
  """The compute dtype for a `model.dtype` name; "auto" looks at `backend`
  (default `jax.default_backend()`)."""
  if name not in DTYPES:
    raise ValueError(f"unknown model.dtype {name!r}; valid: {', '.join(DTYPES)}")
  if name != "auto":
    return DTYPES[name]
  backend = backend or jax.default_backend()
  return jnp.bfloat16 if backend in _ACCELERATORS else jnp.float32


def default_config() -> ml_collections.ConfigDict:
  """Every model key with its default (the XBM reference where it has one)."""
  return ml_collections.ConfigDict(
    {
      "name": "resnet50",  # one of NAMES
      "embed_dim": 128,  # D of the embedding (paper: 128 for ResNet-50, 512 BN-Inc.)
      "pool": "max",  # global pooling before the Dense: max (paper) | avg | gem
      "stem_relu": False,  # ResNet only: reference stem has NO ReLU after bn1
      "layer4_stride": 2,  # ResNet only: 1 keeps layer4 at 1/16 resolution
      "frozen_bn": False,  # BN uses running stats and never updates
      "dtype": "float32",  # compute dtype: float32 | bfloat16 | auto (params stay f32)
      "init_from": ml_collections.config_dict.placeholder(str),  # converted .msgpack
      "width": 32,  # small_cnn only: channels of the first block
    }
  )


class EmbeddingModel(nn.Module):
  """Backbone -> EmbeddingHead.

  `apply(variables, images, train=bool, mutable=[...])`: images `[B, H, W, C]` uint8 or
  float 0..255 (RGB or grayscale) -> `[B, embed_dim]` float32 unit rows.
  Variables: {"params": {"backbone", "head"}, "batch_stats": {"backbone"}}.
  Other entry points (via `method=`): `features` (pooled `[B, C]` float32, before the
  head), `feature_map` (`[B, h, w, C]` in the compute dtype), `features_and_embeddings`
  (both from one backbone pass) and `project_features` (`[N, C]` pooled features ->
  `[N, embed_dim]` unit rows through the head alone; needs only `params["head"]`).
  `project_features(features(x))` is the default forward, bit for bit.
  """

  backbone: nn.Module
  embed_dim: int
  pool: str = "max"

  def setup(self):
    self.head = EmbeddingHead(embed_dim=self.embed_dim, pool=self.pool)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    return self.head(self.backbone(images, train=train))

  def feature_map(self, images: jax.Array, train: bool = False) -> jax.Array:
    return self.backbone(images, train=train)

  def features(self, images: jax.Array, train: bool = False) -> jax.Array:
    return global_pool(self.backbone(images, train=train), self.pool)

  def features_and_embeddings(self, images: jax.Array, train: bool = False):
    """`([B, C] pooled float32, [B, embed_dim] unit rows)` from one backbone pass."""
    pooled = self.features(images, train=train)
    return pooled, self.head.project(pooled)

  def project_features(self, pooled: jax.Array) -> jax.Array:
    """`[N, C]` pooled features -> `[N, embed_dim]` float32 unit rows (the head alone)."""
    return self.head.project(pooled)


def make_backbone(
  name: str,
  *,
  stem_relu: bool = False,
  layer4_stride: int = 2,
  frozen_bn: bool = False,
  dtype: Any = jnp.float32,
  axis_name: Optional[str] = None,
  width: int = 32,
) -> nn.Module:
  """The backbone module alone. ResNet-only switches are ignored by the others."""
  common = dict(frozen_bn=frozen_bn, bn_axis_name=axis_name, dtype=dtype)
  if name in ("resnet50", "resnet18"):
    return ResNet(depth=int(name[6:]), stem_relu=stem_relu, layer4_stride=layer4_stride, **common)
  if name == "bninception":
    return BNInception(**common)
  if name == "googlenet":
    return GoogLeNet(**common)
  if name == "small_cnn":
    return SmallCNN(width=width, **common)
  raise ValueError(f"unknown model name {name!r}; valid: {', '.join(NAMES)}")


def create(model_cfg: Mapping[str, Any], *, axis_name: Optional[str] = None) -> nn.Module:
  """Builds the EmbeddingModel described by `model_cfg` (ConfigDict or dict).

  Missing keys take `default_config()` values; unknown keys, names, pools and dtypes raise
  a ValueError listing the valid ones. `axis_name` (e.g. "data") makes train-mode BN
  average its batch statistics over that mapped axis (use inside shard_map).
  `init_from` is not read here: pass it to `init_variables`/`load_pretrained`.
  """
  cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
  defaults = default_config().to_dict()
  unknown = sorted(set(cfg) - set(defaults))
  if unknown:
    raise ValueError(f"unknown model config key(s) {unknown}; valid: {sorted(defaults)}")
  cfg = {**defaults, **cfg}
  if cfg["name"] not in NAMES:
    raise ValueError(f"unknown model name {cfg['name']!r}; valid: {', '.join(NAMES)}")
  if cfg["pool"] not in POOLS:
    raise ValueError(f"unknown model.pool {cfg['pool']!r}; valid: {', '.join(POOLS)}")
  dtype = resolve_dtype(cfg["dtype"])
  if not isinstance(cfg["embed_dim"], int) or cfg["embed_dim"] < 1:
    raise ValueError(f"model.embed_dim must be a positive int; got {cfg['embed_dim']!r}")
  backbone = make_backbone(
    cfg["name"],
    stem_relu=bool(cfg["stem_relu"]),
    layer4_stride=int(cfg["layer4_stride"]),
    frozen_bn=bool(cfg["frozen_bn"]),
    dtype=dtype,
    axis_name=axis_name,
    width=int(cfg["width"]),
  )
  return EmbeddingModel(backbone=backbone, embed_dim=cfg["embed_dim"], pool=cfg["pool"])


def init_variables(
  module: nn.Module,
  rng: jax.Array,
  *,
  image_size: int = 224,
  channels: int = 3,
  init_from: Optional[str] = None,
) -> dict:
  """Variables for an EmbeddingModel: {"params": {backbone, head}, "batch_stats"}.

  Without `init_from`, everything is freshly initialised (one eval-mode trace on a zero
  batch). With a converted checkpoint path, the backbone comes from the file and only
  the head is initialised; the random backbone init (slow to compile on CPU) is skipped.
  """
  dummy = jnp.zeros((1, image_size, image_size, channels), jnp.uint8)
  if not init_from:
    return dict(jax.jit(lambda r: module.init(r, dummy, train=False))(rng))
  shapes = jax.eval_shape(lambda r: module.init(r, dummy, train=False), rng)
  in_features = shapes["params"]["head"]["fc"]["kernel"].shape[0]
  head = EmbeddingHead(embed_dim=module.embed_dim, pool=module.pool)
  head_params = head.init(rng, jnp.zeros((1, 1, 1, in_features), jnp.float32))["params"]
  variables = {
    "params": {**shapes["params"], "head": head_params},
    "batch_stats": dict(shapes["batch_stats"]),
  }
  return load_pretrained(variables, init_from)
