r"""The embedded glyph dataset: XBM on this CPU, offline, in minutes.

    python scripts/train.py --config=configs/glyphs.py --workdir=/tmp/xbm_glyphs
    python scripts/train.py --config=configs/glyphs.py --workdir=/tmp/glyphs_base \
        --config.xbm.enabled=False                 # the no-memory baseline
    python scripts/report.py --workdir /tmp/xbm_glyphs --workdir /tmp/glyphs_base --out /tmp/rep

Each class is one character, each image one typeface (32 x 32 grayscale; see
xbm_jax/data/glyphs_data/FONTS.md). Train and test classes are disjoint;
evaluation is leave-one-out Recall@K on the 24,648 images of the 1,465 test classes.

Measured at commit 9b9b782 (seed 0; logs in benchmarks/out/demo/): this default, the
reference recipe (memory 8,192 from step 300, weight 1, lr 1e-3 from scratch, 1,200
steps), ends at test R@1 0.7198 with the memory and R@1 0.8414 without it. Here the
memory hurts: its summed term ends ~7x the batch term and speeds the drift up. The
README's memory study compares tuned arms over several seeds.

Variants: `:smoke` (a few steps, for tests), `:seed=1`, `:warm` (600 steps at lr 1e-4
from the committed no-memory weights, the memory on at once), `:study` (the study's
protocol: train on 1,200 of the 1,500 train classes, tune on the other 300 ("val"),
test once at the end), `:pretrained` (compose as `study,pretrained`: start from
`glyphs_data/pretrained_small_cnn32.msgpack`, an encoder pretrained by classification
on 3,390 JIS level-2 kanji that are NOT target classes (scripts/pretrain_glyphs.py, the
analog of ImageNet), then fine-tune on "train_fit5" (the 1,200 train_fit classes, a
fixed seeded 5 typefaces each: 6,000 images, SOP-like) at lr 1e-4 with the memory
holding the whole train set from step 0).
"""

import os

from xbm_jax.data import glyphs
from xbm_jax.train import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, smoke=False, seed=0, warm=False, study=False, pretrained=False)
  c = config_lib.base()
  c.seed = args.seed
  c.input.dataset = "glyphs"
  c.input.batch_size, c.input.samples_per_class = 64, 4
  c.input.eval_batch_size = 512
  c.input.transform = dict(resize=32, crop=28, scale=(0.6, 1.0), ratio=(0.8, 1.25), flip=False)
  c.model.name, c.model.embed_dim, c.model.width = "small_cnn", 64, 32
  c.loss.name = "contrastive"
  c.xbm.size, c.xbm.start_step, c.xbm.weight = 8192, 300, 1.0
  c.optim.name, c.optim.lr, c.optim.weight_decay = "adam", 1e-3, 5e-4
  c.optim.schedule = "constant"
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 1200, 50, 400
  c.train.best_metric = "eval/glyphs/recall@1"
  c.evals.glyphs = dict(
    type="leave_one_out", split="test", ks=(1, 2, 4, 8), every_steps=400, map_at_r=True
  )
  c.drift.interval, c.drift.deltas, c.drift.probe_size = 100, (100, 200), 256
  if args.warm:
    # The paper's regime (a trained backbone at a low learning rate): start from the
    # committed 1,200-step no-memory run and fine-tune with the memory on at once.
    c.train.init_from = os.path.join(
      os.path.dirname(glyphs.__file__), "glyphs_data", "warm_start_small_cnn32.msgpack"
    )
    c.train.steps, c.optim.lr, c.xbm.start_step = 600, 1e-4, 0
    c.evals.glyphs.every_steps = 200
  if args.study:
    # benchmarks/xbm_study.py: train on 1,200 of the 1,500 train classes, tune on the
    # other 300 ("val", R@1 every 100 steps), report test once at the end.
    c.input.train_split = "train_fit"
    c.train.steps, c.train.checkpoint_every = 400, 10**9
    c.train.best_metric = ""
    c.evals = dict(
      val=dict(type="leave_one_out", split="val", ks=(1, 8), every_steps=100, map_at_r=True),
      test=dict(
        type="leave_one_out", split="test", ks=(1, 2, 4, 8), every_steps=10**9, map_at_r=True
      ),
    )
    c.pictures.enabled = False
    c.drift.interval, c.drift.deltas = 50, (50, 100)
  if args.smoke:
    c.input.batch_size, c.input.eval_batch_size = 16, 64
    c.model.embed_dim, c.model.width = 16, 8
    c.xbm.size, c.xbm.start_step = 64, 2
    c.train.steps, c.train.log_every, c.train.checkpoint_every = 6, 2, 3
    for ev in c.evals.values():
      ev.every_steps = min(int(ev.every_steps), 6)
    c.drift.interval, c.drift.deltas, c.drift.probe_size = 2, (2, 4), 16
  if args.pretrained:
    _paper_regime(c)
  return c


PRETRAINED = os.path.join(
  os.path.dirname(glyphs.__file__), "glyphs_data", "pretrained_small_cnn32.msgpack"
)
TRAIN_FIT5_IMAGES = 6000  # len(glyphs.load_arrays("train_fit5")): 1,200 classes x 5


def _paper_regime(c):
  """`:pretrained`: fine-tune the disjoint-corpus encoder on the few-shot split.

  Sits after `:smoke`: the weights fix the model's shape, so `pretrained,smoke` keeps the
  real small_cnn (width 32, embed_dim 64) and only shortens the run.
  """
  c.train.init_from = PRETRAINED
  c.model.embed_dim, c.model.width = 64, 32
  c.input.train_split = "train_fit5"
  c.optim.lr = 1e-4
  c.xbm.size, c.xbm.start_step = TRAIN_FIT5_IMAGES, 0
