r"""Cars196 (classes 1-98 train, 99-196 test); BN-Inception 512-d: R@1 82.0 (paper).

    python scripts/prepare_data.py --dataset cars --manual_dir ~/cars --data_dir ~/tfds
    python scripts/train.py --config=configs/cars.py --workdir=/tmp/xbm_cars \
        --config.input.data_dir=~/tfds --config.model.init_from=~/weights/bninception.msgpack

Leave-one-out R@1/2/4/8 on the test classes. The training sets are small
(~5-8k images), so the memory covers the whole set.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
  "_cub_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "cub.py")
)
_cub = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cub)


def get_config(arg=None):
  return _cub.build("cars", arg)
