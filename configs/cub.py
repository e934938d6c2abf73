r"""CUB-200-2011 (classes 1-100 train, 101-200 test); BN-Inception 512-d: R@1 65.8 (paper).

    python scripts/prepare_data.py --dataset cub --manual_dir ~/cub --data_dir ~/tfds
    python scripts/train.py --config=configs/cub.py --workdir=/tmp/xbm_cub \
        --config.input.data_dir=~/tfds --config.model.init_from=~/weights/bninception.msgpack

Leave-one-out R@1/2/4/8 on the test classes. The training sets are small
(~5-8k images), so the memory covers the whole set.
"""

from xbm_jax.train import config as config_lib


def get_config(arg=None):
  return build("cub", arg)


def build(dataset: str, arg=None):
  """The CUB / Cars recipe (the same but for the dataset's name); cars.py calls it."""
  args = config_lib.parse_arg(arg, smoke=False)
  c = config_lib.base()
  c.input.dataset = dataset
  # A grain worker per core but one (-1); in-process for the tiny smoke images.
  c.input.worker_count = 0 if args.smoke else -1
  c.model.dtype = "auto"  # bf16 activations on GPU/TPU, float32 on CPU
  c.model.name, c.model.embed_dim = "bninception", 512
  c.xbm.size, c.xbm.start_step = 5_000, 1000
  c.optim.plateau.metric = f"eval/{dataset}/recall@1"
  c.train.steps, c.train.best_metric = 5_000, f"eval/{dataset}/recall@1"
  c.evals[dataset] = dict(
    type="leave_one_out", split="test", ks=(1, 2, 4, 8), every_steps=500, map_at_r=True
  )
  if args.smoke:
    config_lib.apply_smoke(c, eval_ks=(1, 2))
  return c
