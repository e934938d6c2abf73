"""Evaluators chosen by config, each yielding named metrics such as `eval/sop/recall@1`.

Config (one entry per evaluator, e.g. in `configs/sop.py`):

    config.evals.sop = dict(type="leave_one_out", split="test", ks=(1, 10, 100, 1000),
                            every_steps=5000, map_at_r=True)
    config.evals.inshop = dict(type="query_gallery", query_split="query",
                               gallery_split="gallery", ks=(1, 10, 20, 30, 40, 50))
    config.evals.vid = dict(type="vehicleid", ks=(1, 5),
                            splits=dict(small="test_800", medium="test_1600",
                                        large="test_2400"))

The trainer checks every evaluator config before the run
(`xbm_jax.train.validation`: the keys each type allows and requires are its class's
`allowed_keys` and `required_keys`), calls `create(name, cfg)` once, then
`evaluator.run(embed_split)` at the evaluation steps, where `embed_split(split_name)` returns an extract-dict
(`xbm_jax.evaluation.extract.extract`). Metric names: `eval/<name>/recall@<k>`,
`eval/<name>/map@r`, `eval/<name>/r_precision`, `eval/<name>/precision@1`,
`eval/<name>/num_queries`, `eval/<name>/num_singleton_excluded` (VehicleID adds the set:
`eval/<name>/small/recall@1`). `<name>` is the key in `config.evals`; one named after a
stock dataset (as the shipped configs name theirs) takes the name of
`config.input.dataset` before training (`xbm_jax.train.setup.name_evaluators`), so a
config reused for `--config.input.dataset=mine` logs `eval/mine/...`.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

from jax.sharding import Mesh

from xbm_jax.evaluation import protocols

EmbedSplit = Callable[[str], Mapping]

_COMMON = {"type", "ks", "every_steps", "map_at_r", "block_size"}


def _as_dict(cfg) -> dict:
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  return dict(cfg)


class Evaluator:
  """Base class: `run(embed_split) -> {metric name: float}`. The config was checked
  before (`xbm_jax.train.validation`): known keys, the required ones, non-empty `ks`."""

  allowed_keys = frozenset(_COMMON)
  required_keys = frozenset()

  def __init__(self, name: str, cfg: Mapping, *, mesh: Optional[Mesh] = None):
    self.name = name
    self.ks = tuple(int(k) for k in cfg["ks"])
    self.map_at_r = bool(cfg.get("map_at_r", True))
    self.block_size = int(cfg.get("block_size", 1024))
    self.mesh = mesh

  def split_names(self) -> list[str]:
    """Every split this evaluator embeds, in order."""
    raise NotImplementedError

  def retrieval_splits(self) -> Optional[tuple[str, str]]:
    """(query split, gallery split) when the evaluator ranks one gallery for one
    query set (its R@1 then has a chance level), else None."""
    return None

  def picture_splits(self) -> tuple[str, str]:
    """(query split, gallery split) of the retrieval pictures."""
    first = self.split_names()[0]
    return self.retrieval_splits() or (first, first)

  def _kw(self):
    return dict(ks=self.ks, map_at_r=self.map_at_r, block_size=self.block_size, mesh=self.mesh)

  def _named(self, res: Mapping) -> dict:
    return {f"eval/{self.name}/{k}": float(v) for k, v in res.items()}

  def run(self, embed_split: EmbedSplit) -> dict:
    raise NotImplementedError


class LeaveOneOut(Evaluator):
  """Every image of `split` queries all the others (SOP, CUB, Cars)."""

  allowed_keys = frozenset(_COMMON | {"split"})
  required_keys = frozenset({"split"})

  def __init__(self, name, cfg, *, mesh=None):
    super().__init__(name, cfg, mesh=mesh)
    self.split = cfg["split"]

  def split_names(self):
    return [self.split]

  def retrieval_splits(self):
    return self.split, self.split

  def run(self, embed_split):
    return self._named(protocols.leave_one_out(embed_split(self.split), **self._kw()))


class QueryGallery(Evaluator):
  """`query_split` against `gallery_split` (In-shop)."""

  allowed_keys = frozenset(_COMMON | {"query_split", "gallery_split"})
  required_keys = frozenset({"query_split", "gallery_split"})

  def __init__(self, name, cfg, *, mesh=None):
    super().__init__(name, cfg, mesh=mesh)
    self.query_split = cfg["query_split"]
    self.gallery_split = cfg["gallery_split"]

  def split_names(self):
    return [self.query_split, self.gallery_split]

  def retrieval_splits(self):
    return self.query_split, self.gallery_split

  def run(self, embed_split):
    res = protocols.query_gallery(
      embed_split(self.query_split), embed_split(self.gallery_split), **self._kw()
    )
    return self._named(res)


class VehicleID(Evaluator):
  """Leave-one-out on each VehicleID test set; `splits` maps set name -> split name."""

  allowed_keys = frozenset(_COMMON | {"splits"})
  default_splits = {"small": "test_800", "medium": "test_1600", "large": "test_2400"}

  def __init__(self, name, cfg, *, mesh=None):
    super().__init__(name, cfg, mesh=mesh)
    self.splits = dict(cfg.get("splits") or self.default_splits)

  def split_names(self):  # pictures: the first test set
    return list(self.splits.values())

  def run(self, embed_split):
    sets = {size: embed_split(split) for size, split in self.splits.items()}
    return self._named(protocols.vehicleid(sets, **self._kw()))


REGISTRY = {
  "leave_one_out": LeaveOneOut,
  "query_gallery": QueryGallery,
  "vehicleid": VehicleID,
}


def create(name: str, cfg, *, mesh: Optional[Mesh] = None) -> Evaluator:
  """Builds the evaluator `config.evals.<name>` (a dict or ConfigDict with a `type`)."""
  cfg = _as_dict(cfg)
  return REGISTRY[cfg["type"]](name, cfg, mesh=mesh)
