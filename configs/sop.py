r"""Stanford Online Products, the paper's ResNet-50 128-d contrastive + XBM recipe.

    python scripts/prepare_data.py --dataset sop --manual_dir ~/Stanford_Online_Products_parent --data_dir ~/tfds
    python scripts/convert_weights.py --arch resnet50 --torch-file resnet50-19c8e357.pth --out ~/weights/resnet50.msgpack
    python scripts/train.py --config=configs/sop.py --workdir=/tmp/xbm_sop \
        --config.input.data_dir=~/tfds --config.model.init_from=~/weights/resnet50.msgpack

Target (paper, Table 5): R@1 / 10 / 100 = 80.6 / 91.6 / 96.2. Users of the
reference code report ~75. Baseline without memory: `--config.xbm.enabled=False`.
`get_config("smoke")` shrinks everything for a quick check on fake-sized data.
"""

from xbm_jax.train import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, smoke=False)
  c = config_lib.base()
  c.input.dataset = "sop"
  # A grain worker per core but one (-1); in-process for the tiny smoke images.
  c.input.worker_count = 0 if args.smoke else -1
  c.model.dtype = "auto"  # bf16 activations on GPU/TPU, float32 on CPU
  c.input.batch_size, c.input.samples_per_class = 64, 4  # 16 classes x 4
  c.model.name, c.model.embed_dim, c.model.pool = "resnet50", 128, "max"
  c.model.stem_relu = False  # the reference's stem
  c.loss.name = "contrastive"
  c.xbm.size, c.xbm.start_step, c.xbm.weight = 55_000, 1000, 1.0
  c.optim.name, c.optim.lr, c.optim.weight_decay = "adam", 1e-4, 5e-4
  c.optim.schedule = "plateau"
  c.optim.plateau.metric = "eval/sop/recall@1"
  c.train.steps = 35_000
  c.train.best_metric = "eval/sop/recall@1"
  c.evals.sop = dict(
    type="leave_one_out", split="test", ks=(1, 10, 100, 1000), every_steps=5000, map_at_r=True
  )
  c.drift.interval, c.drift.deltas = 500, (500, 1000)
  if args.smoke:
    config_lib.apply_smoke(c)
  return c
