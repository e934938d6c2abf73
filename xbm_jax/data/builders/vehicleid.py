"""PKU VehicleID (Liu et al., CVPR 2016).

Layout: `VehicleID_V1.0/train_test_split/train_list.txt`, `test_list_800.txt`,
`test_list_1600.txt`, `test_list_2400.txt` (`name vehicle_id` per line) and
`image/<name>.jpg`. Splits: train (13,134 identities), test_800 / test_1600 /
test_2400 (small / medium / large). `label` = vehicle_id.
"""

from __future__ import annotations

import os

from xbm_jax.data.builders import common

NAME = "vehicleid"
SPLITS = ("train", "test_800", "test_1600", "test_2400")
FOLDERS = ("VehicleID_V1.0", "VehicleID")
DESCRIPTION = (
  "PKU VehicleID; label = official vehicle_id; index = line order of train_test_split/<list>."
)
_LISTS = {
  "train": "train_list.txt",
  "test_800": "test_list_800.txt",
  "test_1600": "test_list_1600.txt",
  "test_2400": "test_list_2400.txt",
}


def entries(manual_dir: str) -> dict[str, list[common.Entry]]:
  root = common.find_root(manual_dir, "train_test_split", FOLDERS)
  out = {}
  for split, list_name in _LISTS.items():
    path = os.path.join(root, "train_test_split", list_name)
    rows = []
    for lineno, line in common.read_lines(path):
      name, vid = common.fields(path, lineno, line, 2, names="name vehicle_id")
      rel = f"image/{name}.jpg"
      rows.append(
        common.Entry(os.path.join(root, rel), common.to_int(vid, path, lineno, "vehicle_id"), rel)
      )
    out[split] = rows
  return out
