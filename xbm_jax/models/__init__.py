"""Backbones + embedding head for XBM (flax.linen).

    model = xbm_jax.models.create(cfg.model, axis_name="data")
    variables = xbm_jax.models.init_variables(model, rng, init_from=cfg.model.init_from)
    emb = model.apply(variables, images, train=False)        # [B, D] float32 unit rows

Names: resnet50, resnet18 (torchvision), bninception (Cadene), googlenet (torchvision),
small_cnn (tests / glyph demo). Pretrained weights: scripts/convert_weights.py.
"""

from xbm_jax.models.factory import (
  NAMES,
  EmbeddingModel,
  create,
  default_config,
  init_variables,
  make_backbone,
)
from xbm_jax.models.head import EmbeddingHead, global_pool
from xbm_jax.models.pretrained import load_pretrained

__all__ = [
  "NAMES",
  "EmbeddingHead",
  "EmbeddingModel",
  "create",
  "default_config",
  "global_pool",
  "init_variables",
  "load_pretrained",
  "make_backbone",
]
