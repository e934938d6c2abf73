r"""SOP with BN-Inception, 512-d (the paper's second backbone).

    python scripts/convert_weights.py --arch bn_inception --torch-file bn_inception-52deb4733.pth --out ~/weights/bninception.msgpack
    python scripts/train.py --config=configs/sop_bninception.py --workdir=/tmp/xbm_sop_bni \
        --config.input.data_dir=~/tfds --config.model.init_from=~/weights/bninception.msgpack

Target (paper): R@1 / 10 / 100 = 79.5 / 90.8 / 96.1.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
  "_sop_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sop.py")
)
_sop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sop)


def get_config(arg=None):
  c = _sop.get_config(arg)
  if not (arg or "").startswith("smoke"):
    c.model.name, c.model.embed_dim = "bninception", 512
  return c
