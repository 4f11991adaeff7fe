#!/usr/bin/env bash
# Issue 16's comparison on Fashion-MNIST (eps 0.1): TRADES, TRADES + RAT, TRADES-AWP and TRADES-AWP + RAT, three
# seeds each, in experiment=fashion_mnist_rat's setting (mnist_net, TRADES beta 6 with K = 10 steps of eps/4, Adam
# triangle LR to 5e-3, 10 epochs, batch 100, eps warm-up over 30%; AWP starts after 2 epochs), trained on the first
# $SUBSET training images (30000: half the set, as scripts/sweeps/fashion_mnist_fast_at.sh). Every job evaluates
# clean, PGD-20, CW-Linf and AutoAttack on the first 1000 test images. Then: advtrain-report "$OUT" (the table in
# docs/methods/rat.md).
#
#   scripts/sweeps/fashion_mnist_rat.sh [DATA_ROOT] [OUT]      # defaults: ../shared/data, multirun/fashion_rat
#   SEEDS="0 1 2" SUBSET=30000 EPOCHS=10 EVAL_N=1000           # the defaults; ATTACKS='[pgd20]' for a quick check
#   ONLY='trades_awp trades_awp_rat'                           # these methods only: split over cores, or redo some
#
# Jobs run one after the other, seed by seed (a sweep cut short still compares every method); the documented run
# gives it one core (OMP_NUM_THREADS=1). Rerunning skips finished jobs and resumes unfinished ones.
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-multirun/fashion_rat}
COMMON=(experiment=fashion_mnist_rat "dataset.root=$DATA" "dataset.train_subset=${SUBSET:-30000}"
        "trainer.epochs=${EPOCHS:-10}" "eval.n=${EVAL_N:-1000}" logger=none trainer.progress=lines)
[ -z "${ATTACKS:-}" ] || COMMON+=("attack=$ATTACKS")
ONLY=${ONLY:-}
run() {  # run SEED LABEL OVERRIDES...
  local seed=$1 label=$2; shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $label "* ]]; then return; fi
  advtrain -m "${COMMON[@]}" "seed=$seed" "$@" "hydra.sweep.dir=$OUT/$label" 'hydra.sweep.subdir=seed${seed}'
}
for seed in ${SEEDS:-0 1 2}; do
  run $seed trades method=trades
  run $seed trades_rat method=rat
  run $seed trades_awp method=awp method.base=trades method.warmup_epochs=2
  run $seed trades_awp_rat method=rat method.base=awp_trades method.warmup_epochs=2
done
advtrain-report "$OUT"
