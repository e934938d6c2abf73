"""The benchmark protocols of the DML literature, on top of `metrics.retrieval_metrics`.

Each takes extract-dicts (`dict(emb [N, D], labels [N], index [N])`) and returns a flat
dict of floats whose keys are metric names (`recall@1`, `map@r`, ...).

* **Leave-one-out** (SOP: K = 1, 10, 100, 1000; CUB-200-2011 and Cars196: K = 1, 2, 4, 8):
  every test image queries all the others; singleton classes are excluded and counted.
* **Query vs gallery** (In-shop: K = 1, 10, 20, 30, 40, 50): 14,218 queries against a
  disjoint gallery of 12,612 images; queries whose item is absent from the gallery are
  excluded and counted.
* **VehicleID small / medium / large** (K = 1, 5): in the deep-metric-learning literature
  (e.g. the MS loss and XBM papers, which report R@1 / R@5 on the three sets), each test
  list (`test_list_800/1600/2400.txt`) is evaluated on its own as a **leave-one-out**
  retrieval over all its images. This is how the public DML baselines evaluate it:
  Roth & Brattoli, github.com/Confusezius/Deep-Metric-Learning-Baselines, `datasets.py`
  (`give_VehicleID_datasets` builds one evaluation set per test list) and `evaluate.py`
  (`evaluate_multiple_datasets` runs the single-set leave-one-out evaluation on each).
  It is *not* the re-identification protocol of Liu et al. (CVPR 2016, "Deep Relative
  Distance Learning"), which puts one random image per identity in the gallery and
  averages 10 random splits; numbers from the two protocols are not comparable.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from jax.sharding import Mesh

from xbm_jax.evaluation import metrics

DEFAULT_KS = {
  "sop": (1, 10, 100, 1000),
  "cub": (1, 2, 4, 8),
  "cars": (1, 2, 4, 8),
  "inshop": (1, 10, 20, 30, 40, 50),
  "vehicleid": (1, 5),
}

VEHICLEID_SIZES = {"small": 800, "medium": 1600, "large": 2400}


def _check(data, name):
  for key in ("emb", "labels"):
    if key not in data:
      raise KeyError(f"{name} extract-dict has no {key!r}; keys: {sorted(data)}")


def leave_one_out(
  data: Mapping,
  *,
  ks: Sequence[int],
  map_at_r: bool = True,
  block_size: int = 1024,
  mesh: Optional[Mesh] = None,
) -> dict:
  """Every item queries all the others (self excluded by index)."""
  _check(data, "leave_one_out")
  return metrics.retrieval_metrics(
    data["emb"],
    data["labels"],
    ks=ks,
    self_exclude=True,
    map_at_r=map_at_r,
    block_size=block_size,
    mesh=mesh,
  )


def query_gallery(
  query: Mapping,
  gallery: Mapping,
  *,
  ks: Sequence[int],
  map_at_r: bool = True,
  block_size: int = 1024,
  mesh: Optional[Mesh] = None,
) -> dict:
  """Queries against a separate gallery (no self exclusion)."""
  _check(query, "query")
  _check(gallery, "gallery")
  return metrics.retrieval_metrics(
    query["emb"],
    query["labels"],
    gallery["emb"],
    gallery["labels"],
    ks=ks,
    self_exclude=False,
    map_at_r=map_at_r,
    block_size=block_size,
    mesh=mesh,
  )


def vehicleid(
  sets: Mapping[str, Mapping],
  *,
  ks: Sequence[int] = (1, 5),
  map_at_r: bool = True,
  block_size: int = 1024,
  mesh: Optional[Mesh] = None,
) -> dict:
  """Leave-one-out on each VehicleID test set (see the module docstring for the source).

  Args:
    sets: `{"small": extract-dict, "medium": ..., "large": ...}` (any subset, any names).
  Returns:
    `{"small/recall@1": ..., "small/map@r": ..., "medium/recall@1": ..., ...}`.
  """
  out = {}
  for size, data in sets.items():
    res = leave_one_out(data, ks=ks, map_at_r=map_at_r, block_size=block_size, mesh=mesh)
    out.update({f"{size}/{k}": v for k, v in res.items()})
  return out
