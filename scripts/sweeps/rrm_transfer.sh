#!/usr/bin/env bash
# Issue 15's comparison: does RRM carry a robust teacher's robustness to a student of another architecture, and at
# what cost? Per dataset (MNIST at eps 0.3, Fashion-MNIST at eps 0.1): a PGD-AT teacher (mnist_net), then four
# students of one other architecture (madry_cnn, about 20x mnist_net's multiply-adds), with the same epochs, LR
# schedule and batch: natural training, RRM from that teacher (the paper's cosine loss, and the relative L2 loss that
# transferred more in docs/methods/rrm.md's exploration), FREE (m = 8, the paper's fast baseline) and PGD-AT.
# Teacher and PGD-AT student use one attack, PGD-10 with step 2.5 eps / 10 (Madry et al.'s rule; the paper's
# CIFAR teacher is PGD-7). Every job trains on the first $SUBSET training images (10 epochs, Adam triangle LR to
# 5e-3, batch 100, eps warm-up over 30% for the attacking methods) and evaluates clean, PGD-50-10 and AutoAttack on
# the first 1000 test images. Then advtrain-report "$OUT": RRM's row shows its time without and with the teacher's.
#
#   scripts/sweeps/rrm_transfer.sh [DATA_ROOT] [OUT] [DATASET ...]   # defaults: ../shared/data, multirun/rrm,
#                                                                    # mnist fashion_mnist
#   SUBSET=10000 EPOCHS=10 EVAL_N=1000 ATTACKS='[pgd50,autoattack]'  # the defaults; smaller for a quick check
#   ONLY='student_pgd10 student_free8'   # run these jobs only (the teacher must be finished): split over cores
#
# Jobs run one after the other; the documented run gives each dataset's sweep one core (OMP_NUM_THREADS=1, one
# process per dataset). Rerunning skips finished jobs (their results.json exists) and resumes unfinished ones.
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-multirun/rrm}
shift $(( $# < 2 ? $# : 2 ))
DATASETS=("$@")
[ ${#DATASETS[@]} -gt 0 ] || DATASETS=(mnist fashion_mnist)
SUBSET=${SUBSET:-10000}
EPOCHS=${EPOCHS:-10}
EVAL_N=${EVAL_N:-1000}
ATTACKS=${ATTACKS:-[pgd50,autoattack]}
ONLY=${ONLY:-}

for dataset in "${DATASETS[@]}"; do
  case $dataset in
    mnist) alpha=0.075 ;;          # 2.5 * 0.3 / 10
    fashion_mnist) alpha=0.025 ;;  # 2.5 * 0.1 / 10
    *) echo "rrm_transfer.sh: dataset must be mnist or fashion_mnist, got '$dataset'" >&2; exit 2 ;;
  esac
  common=(dataset=$dataset "dataset.root=$DATA" dataset.train_subset=$SUBSET trainer.epochs=$EPOCHS
          trainer.batch_size=100 optim=mnist/adam schedule=cyclic trainer.eps_warmup=0.3 "attack=$ATTACKS"
          eval.n=$EVAL_N logger=none trainer.progress=lines seed=0)
  run() {  # run LABEL OVERRIDES...: one job in $OUT/$dataset/LABEL, skipped once it has results
    local label=$1; shift
    local dir=$OUT/$dataset/$label
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $label "* ]]; then return; fi
    if [ -f "$dir/results.json" ]; then echo "$dir: already finished"; return; fi
    advtrain "${common[@]}" "$@" "hydra.run.dir=$dir"
  }
  run teacher_pgd10 arch=mnist_net method=pgd method.steps=10 method.alpha=$alpha
  teacher=$OUT/$dataset/teacher_pgd10/checkpoints/last.pt
  run student_natural arch=madry_cnn method=natural
  run student_rrm arch=madry_cnn method=rrm "method.teacher=$teacher"   # cosine, w_xent 0.005: the paper's L-inf
  run student_rrm_rel_l2 arch=madry_cnn method=rrm "method.teacher=$teacher" method.feature_loss=rel_l2  # see rrm.md
  run student_free8 arch=madry_cnn method=free method.replays=8
  run student_pgd10 arch=madry_cnn method=pgd method.steps=10 method.alpha=$alpha
done
advtrain-report "$OUT"
