#!/usr/bin/env bash
# The glyph experiment behind the README's results (issues 6 and 8), on CPU.
# Usage: bash benchmarks/glyphs_xbm.sh OUT_DIR [lane]   (lanes "a" and "b" can run in
# parallel; "all" runs both in sequence). Then:
#   python scripts/report.py --workdir OUT_DIR/... --out OUT_DIR/report
set -euo pipefail
OUT=${1:?output dir}
LANE=${2:-all}
cd "$(dirname "$0")/.."
steps_of() { for a in "$@"; do case $a in --config.train.steps=*) echo "${a#*=}";; esac; done; }
run() {  # name, then config overrides
  local name=$1; shift
  [ -f "$OUT/$name/DONE" ] && return 0
  while pgrep -f "workdir=$OUT/$name " > /dev/null; do sleep 20; done   # a driver restarted
  [ -f "$OUT/$name/checkpoints/last/$(steps_of "$@")/_CHECKPOINT_METADATA" ] &&
    touch "$OUT/$name/DONE" && return 0
  python scripts/train.py --config=configs/glyphs.py --workdir="$OUT/$name" \
    --config.train.progress=False "$@" > "$OUT/$name.log" 2>&1
  touch "$OUT/$name/DONE"
}
SCRATCH=(--config.train.steps=1200)            # lr 1e-3 from scratch, memory at 300
WARM=(--config.train.steps=600 --config.optim.lr=1e-4 --config.xbm.start_step=0
      --config.train.init_from="$OUT/scratch_base_s0")
mkdir -p "$OUT"
# Two lanes sized for a 2-core machine (~1 step/s each): the scratch comparison and
# the auto start with one seed, the warm-start comparison with two seeds.
lane_a() {
  run scratch_base_s0 "${SCRATCH[@]}" --config.xbm.enabled=False
  run warm_base_s0 "${WARM[@]}" --config.xbm.enabled=False
  run warm_naive_s0 "${WARM[@]}"
  run warm_mean_s0 "${WARM[@]}" --config.xbm.memory_loss_kwargs.reduction=mean
}
lane_b() {
  run scratch_xbm_s0 "${SCRATCH[@]}"
  run scratch_auto_s0 "${SCRATCH[@]}" --config.xbm.start_step=auto
  while [ ! -f "$OUT/scratch_base_s0/DONE" ]; do sleep 20; done
  run warm_base_s1 "${WARM[@]}" --config.xbm.enabled=False --config.seed=1
  run warm_naive_s1 "${WARM[@]}" --config.seed=1
  run warm_mean_s1 "${WARM[@]}" --config.xbm.memory_loss_kwargs.reduction=mean --config.seed=1
}
# Smaller batches relative to the number of classes (8 x 4), where the in-batch term
# sees the fewest negatives: the regime the memory is meant for.
lane_c() {
  while [ ! -f "$OUT/scratch_base_s0/DONE" ]; do sleep 20; done
  run warm32_base_s0 "${WARM[@]}" --config.xbm.enabled=False --config.input.batch_size=32
  run warm32_mean_s0 "${WARM[@]}" --config.input.batch_size=32 \
    --config.xbm.memory_loss_kwargs.reduction=mean
}
# Second seed of the scratch comparison; the auto start with back-off from the warm start.
lane_d() {
  run scratch_base_s1 "${SCRATCH[@]}" --config.xbm.enabled=False --config.seed=1
  run scratch_xbm_s1 "${SCRATCH[@]}" --config.seed=1
}
lane_e() {
  run scratch_auto_s1 "${SCRATCH[@]}" --config.xbm.start_step=auto --config.seed=1
  run warm_autobackoff_s0 "${WARM[@]}" --config.xbm.start_step=auto --config.xbm.backoff=True
}
lane_f() {
  run warm32_base_s1 "${WARM[@]}" --config.xbm.enabled=False --config.input.batch_size=32 \
    --config.seed=1
  run warm32_mean_s1 "${WARM[@]}" --config.input.batch_size=32 \
    --config.xbm.memory_loss_kwargs.reduction=mean --config.seed=1
}
case $LANE in
  a) lane_a ;;
  c) lane_c ;;
  d) lane_d ;;
  e) lane_e ;;
  f) lane_f ;;
  b) lane_b ;;
  all) lane_a; lane_b ;;
esac
