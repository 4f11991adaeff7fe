#!/usr/bin/env bash
# Issue 17's comparison on Fashion-MNIST (eps 0.1): one OAT run against dedicated models, each trained with the same
# loss at one fixed lambda of OAT's set (method=pgd method.adv_weight=lambda: (1 - lambda) CE(clean) + lambda
# CE(adv), plain BatchNorm; lambda = 0 is natural training), then one OATS run. All in experiment=fashion_mnist_oat's
# setting (bn_cnn, PGD-7 at step 1.25 eps / 7, Adam triangle LR to 5e-3, 10 epochs, batch 100, eps warm-up over
# 30%), trained on the first $SUBSET training images, seed 0. OAT and the dedicated models are evaluated clean,
# PGD-20 and AutoAttack on the first 1000 test images, OAT at each of its 6 lambdas; OATS (18 views of width and
# lambda) clean and PGD-20 only, AutoAttack on 18 views being hours of one CPU core. Then: advtrain-report "$OUT"
# (report_views.png: the trade-off curves) for docs/methods/oat.md.
#
#   scripts/sweeps/fashion_mnist_oat.sh [DATA_ROOT] [OUT]   # defaults: ../shared/data, multirun/fashion_oat
#   SUBSET=30000 EPOCHS=10 EVAL_N=1000                     # the defaults; smaller for a quick check
#   ONLY='oat oats'                                         # these parts only (oat, dedicated, oats): split over
#                                                           # cores, e.g. ONLY=dedicated on a second one
#
# Jobs run one after the other (the documented run: OMP_NUM_THREADS=1, one core of its own); rerunning skips
# finished jobs and resumes unfinished ones.
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-multirun/fashion_oat}
COMMON=("dataset.root=$DATA" "dataset.train_subset=${SUBSET:-30000}" "trainer.epochs=${EPOCHS:-10}"
        "eval.n=${EVAL_N:-1000}" logger=none trainer.progress=lines seed=0)
part() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
if part oat; then
  advtrain experiment=fashion_mnist_oat "${COMMON[@]}" "hydra.run.dir=$OUT/oat"
fi
if part dedicated; then
  advtrain -m experiment=fashion_mnist_oat method=pgd "${COMMON[@]}" method.adv_weight=0,0.1,0.2,0.3,0.4,1.0 \
      "hydra.sweep.dir=$OUT/dedicated" 'hydra.sweep.subdir=lambda${method.adv_weight}'
fi
if part oats; then
  advtrain experiment=fashion_mnist_oats "${COMMON[@]}" 'attack=[pgd20]' "hydra.run.dir=$OUT/oats"
fi
if [ -d "$OUT/dedicated" ]; then  # time against the dedicated PGD-AT model (lambda 1)
  advtrain-report "$OUT" --baseline method.adv_weight=1.0
else
  advtrain-report "$OUT"
fi
