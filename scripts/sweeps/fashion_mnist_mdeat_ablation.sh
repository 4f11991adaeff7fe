#!/usr/bin/env bash
# Why M-DEAT trails PGD-AT on Fashion-MNIST (issue 13): M-DEAT with one of its settings changed at a time, seed 0,
# in fashion_mnist_fast_at.sh's setting (mnist_net, 30k images, 10 epochs, Adam triangle, eps warm-up 0.3, clean /
# PGD-50-10 / AutoAttack on 1000 test images). Then: advtrain-report "$OUT".
#
#   scripts/sweeps/fashion_mnist_mdeat_ablation.sh [DATA_ROOT] [OUT]  # defaults: ../shared/data, multirun/fashion_mdeat
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-multirun/fashion_mdeat}
COMMON=(dataset=fashion_mnist "dataset.root=$DATA" dataset.train_subset=30000 arch=mnist_net trainer.epochs=10
        trainer.batch_size=100 optim=mnist/adam schedule=cyclic trainer.eps_warmup=0.3 "attack=[pgd50,autoattack]"
        eval.n=1000 logger=none trainer.progress=lines seed=0 method=deat)
run() {  # run LABEL OVERRIDES...
  local label=$1; shift
  advtrain "${COMMON[@]}" "$@" "hydra.run.dir=$OUT/$label"
}
run gamma_1.00 method.gamma=1.0                       # the threshold at G itself: r may grow on any rise
run no_warmup trainer.eps_warmup=0                    # G's threshold set at the full eps from the start
run alpha_1.5eps method.alpha=0.15                    # the fast setting's step
run carry method.carry=true                           # FREE's carried perturbation instead of a fresh start
run fixed_d3 method.rule=fixed method.d=3             # DEAT-d: one more replay every 3 epochs, at most 5
run fixed_4 method.rule=fixed method.replays=4 method.d=1000  # four replays throughout
advtrain-report "$OUT"
