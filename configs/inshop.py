r"""In-shop Clothes Retrieval: query vs gallery, ResNet-50 128-d contrastive + XBM.

    python scripts/prepare_data.py --dataset inshop --manual_dir ~/inshop --data_dir ~/tfds
    python scripts/train.py --config=configs/inshop.py --workdir=/tmp/xbm_inshop \
        --config.input.data_dir=~/tfds --config.model.init_from=~/weights/resnet50.msgpack

Target (paper): R@1 / 10 / 20 = 91.3 / 97.8 / 98.4 (the reference code has no
In-shop evaluation; users report 87.4). 3,997 train classes / 25,882 images.
"""

from xbm_jax.train import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, smoke=False)
  c = config_lib.base()
  c.input.dataset = "inshop"
  # A grain worker per core but one (-1); in-process for the tiny smoke images.
  c.input.worker_count = 0 if args.smoke else -1
  c.model.dtype = "auto"  # bf16 activations on GPU/TPU, float32 on CPU
  c.model.name, c.model.embed_dim = "resnet50", 128
  c.xbm.size, c.xbm.start_step = 25_000, 1000
  c.optim.plateau.metric = "eval/inshop/recall@1"
  c.train.steps, c.train.best_metric = 35_000, "eval/inshop/recall@1"
  c.evals.inshop = dict(
    type="query_gallery",
    query_split="query",
    gallery_split="gallery",
    ks=(1, 10, 20, 30, 40, 50),
    every_steps=5000,
    map_at_r=True,
  )
  if args.smoke:
    config_lib.apply_smoke(c, eval_ks=(1, 2))
  return c
