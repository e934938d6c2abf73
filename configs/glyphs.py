r"""The embedded glyph dataset: XBM on this CPU, offline, in minutes.

    python scripts/train.py --config=configs/glyphs.py --workdir=/tmp/xbm_glyphs
    python scripts/train.py --config=configs/glyphs.py --workdir=/tmp/glyphs_base \
        --config.xbm.enabled=False                 # the no-memory baseline
    python scripts/report.py --workdir /tmp/xbm_glyphs --workdir /tmp/glyphs_base --out /tmp/rep

Each class is one character, each image one typeface (32 x 32 grayscale; see
xbm_jax/data/glyphs_data/FONTS.md). Train and test classes are disjoint;
evaluation is leave-one-out Recall@K on the test classes. The numbers measured
with this config (with and without memory, two seeds) are in the README.
Variants: `:smoke` (a few steps, for tests).
"""
import os

from xbm_jax.data import glyphs
from xbm_jax.train import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, smoke=False, seed=0, warm=False)
  c = config_lib.base()
  c.seed = args.seed
  c.input.dataset = "glyphs"
  c.input.batch_size, c.input.samples_per_class = 64, 4
  c.input.eval_batch_size = 512
  c.input.transform = dict(resize=32, crop=28, scale=(0.6, 1.0), ratio=(0.8, 1.25),
                           flip=False)
  c.model.name, c.model.embed_dim, c.model.width = "small_cnn", 64, 32
  c.loss.name = "contrastive"
  c.xbm.size, c.xbm.start_step, c.xbm.weight = 8192, 300, 1.0
  c.optim.name, c.optim.lr, c.optim.weight_decay = "adam", 1e-3, 5e-4
  c.optim.schedule = "constant"
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 1200, 50, 400
  c.train.best_metric = "eval/glyphs/recall@1"
  c.evals.glyphs = dict(type="leave_one_out", split="test", ks=(1, 2, 4, 8),
                        every_steps=400, map_at_r=True)
  c.drift.interval, c.drift.deltas, c.drift.probe_size = 100, (100, 200), 256
  if args.warm:
    # The paper's regime (a trained backbone at a low learning rate): start from the
    # committed 1,200-step no-memory run and fine-tune with the memory on at once.
    c.train.init_from = os.path.join(os.path.dirname(glyphs.__file__), "glyphs_data",
                                     "warm_start_small_cnn32.msgpack")
    c.train.steps, c.optim.lr, c.xbm.start_step = 600, 1e-4, 0
    c.evals.glyphs.every_steps = 200
  if args.smoke:
    c.input.batch_size, c.input.eval_batch_size = 16, 64
    c.model.embed_dim, c.model.width = 16, 8
    c.xbm.size, c.xbm.start_step = 64, 2
    c.train.steps, c.train.log_every, c.train.checkpoint_every = 6, 2, 3
    c.evals.glyphs.every_steps = 6
    c.drift.interval, c.drift.deltas, c.drift.probe_size = 2, (2, 4), 16
  return c
