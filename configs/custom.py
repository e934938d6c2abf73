r"""Your own data: a dataset prepared from list files (or class folders) under a name.

    python scripts/prepare_data.py --dataset listfile --name mydata \
        --manual_dir ~/mydata --data_dir ~/tfds
    python scripts/train.py --config=configs/custom.py:name=mydata --workdir=/tmp/xbm_mydata \
        --config.input.data_dir=~/tfds --config.model.init_from=~/weights/bninception.msgpack

`~/mydata` holds `train.txt` and `test.txt`, one `relative/path.jpg,label` per line
(or `train/<class>/*.jpg` and `test/<class>/*.jpg` folders). The recipe is the
CUB / Cars one (BN-Inception 512-d, contrastive loss, memory 5,000 from step 1,000,
5,000 steps): training on `train`, leave-one-out Recall@1/2/4/8 and MAP@R on the
classes of `test` (classes unseen in training, as in the benchmarks), logged as
`eval/<name>/recall@1`. Arguments: `name=` (the `--name` given to prepare_data.py),
`smoke` (a tiny CNN on 32 x 32 crops for 6 steps: checks the wiring in seconds).
"""

from xbm_jax.configs import cub
from xbm_jax.train import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, name="mydata", smoke=False)
  return cub.build(args.name, "smoke" if args.smoke else None)
