r"""Cars196 (classes 1-98 train, 99-196 test); BN-Inception 512-d: R@1 82.0 (paper).

    python scripts/prepare_data.py --dataset cars --manual_dir ~/cars --data_dir ~/tfds
    python scripts/train.py --config=configs/cars.py --workdir=/tmp/xbm_cars \
        --config.input.data_dir=~/tfds --config.model.init_from=~/weights/bninception.msgpack

Leave-one-out R@1/2/4/8 on the test classes. The training sets are small
(~5-8k images), so the memory covers the whole set.
"""

# The shared CUB/Cars recipe, imported from the installed package (xbm_jax.configs is
# this folder, shipped with the package).
from xbm_jax.configs import cub


def get_config(arg=None):
  return cub.build("cars", arg)
