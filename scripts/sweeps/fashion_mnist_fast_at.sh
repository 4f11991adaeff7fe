#!/usr/bin/env bash
# Issue 13's comparison on Fashion-MNIST (eps 0.1), where MNIST saturates: PGD-AT (PGD-10), FREE-8, M-DEAT, GAAT with
# its defaults, GAAT without the approximation and without carry, and PGD-4 with step eps/2, three seeds each, one
# model (mnist_net), epochs, schedule and batch for all, trained on the first 30000 training images (half the set, so
# that 21 runs fit in an afternoon on one CPU core). Every job evaluates clean, PGD-50-10 and AutoAttack on the first
# 1000 test images. Then: advtrain-report (the tables in docs/methods/gaat.md and deat.md).
#
#   scripts/sweeps/fashion_mnist_fast_at.sh [DATA_ROOT] [OUT]      # defaults: ../shared/data, multirun/fashion_fast_at
#
# Jobs run one after the other in this process's launcher (Hydra's basic one), so their times are comparable on an
# otherwise idle machine (the documented run: OMP_NUM_THREADS=1, one core of its own); rerunning the script skips
# finished jobs and resumes unfinished ones.
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-multirun/fashion_fast_at}
COMMON=(dataset=fashion_mnist "dataset.root=$DATA" dataset.train_subset=30000 arch=mnist_net trainer.epochs=10
        trainer.batch_size=100 optim=mnist/adam schedule=cyclic trainer.eps_warmup=0.3 "attack=[pgd50,autoattack]"
        eval.n=1000 logger=none trainer.progress=lines)
run() {  # run SEED LABEL OVERRIDES...
  local seed=$1 label=$2; shift 2
  advtrain -m "${COMMON[@]}" "seed=$seed" "$@" "hydra.sweep.dir=$OUT/$label" 'hydra.sweep.subdir=seed${seed}'
}
for seed in 0 1 2; do  # seed by seed: a sweep cut short still compares every method
  run $seed pgd10 method=pgd method.steps=10 method.alpha=0.025           # Madry et al.'s step: 2.5 eps / K
  run $seed free8 method=free method.replays=8
  run $seed mdeat method=deat method.rule=magnitude
  run $seed gaat method=gaat
  run $seed gaat_no_approx method=gaat method.approx=false
  run $seed gaat_no_carry method=gaat method.carry=false
  run $seed pgd4 method=pgd method.steps=4 method.alpha=0.05              # step eps/2: 4 exact gradients as GAAT, no approximation, no carry
done
advtrain-report "$OUT" --baseline method.steps=10   # PGD-10 is the yardstick; PGD-4 runs too
