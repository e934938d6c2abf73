r"""VehicleID: small / medium / large test sets (800 / 1600 / 2400 identities).

    python scripts/prepare_data.py --dataset vehicleid --manual_dir ~/VehicleID_V1.0 --data_dir ~/tfds
    python scripts/train.py --config=configs/vehicleid.py --workdir=/tmp/xbm_vid \
        --config.input.data_dir=~/tfds --config.model.init_from=~/weights/resnet50.msgpack

Metrics: R@1 / R@5 on each test size (the paper's VehicleID table gives the
targets for its backbones; they are not restated here). 13,134 train identities.
"""

from xbm_jax.train import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, smoke=False)
  c = config_lib.base()
  c.input.dataset = "vehicleid"
  # A grain worker per core but one (-1); in-process for the tiny smoke images.
  c.input.worker_count = 0 if args.smoke else -1
  c.model.dtype = "auto"  # bf16 activations on GPU/TPU, float32 on CPU
  c.model.name, c.model.embed_dim = "resnet50", 128
  c.xbm.size, c.xbm.start_step = 100_000, 1000
  c.optim.plateau.metric = "eval/vehicleid/small/recall@1"
  c.train.steps, c.train.best_metric = 35_000, "eval/vehicleid/small/recall@1"
  # Each test list scored leave-one-out (Roth & Brattoli's DML baselines protocol).
  c.evals.vehicleid = dict(
    type="vehicleid",
    ks=(1, 5),
    every_steps=5000,
    map_at_r=False,
    splits=dict(small="test_800", medium="test_1600", large="test_2400"),
  )
  if args.smoke:
    config_lib.apply_smoke(c, eval_ks=(1, 5))
  return c
