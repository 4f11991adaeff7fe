#!/usr/bin/env bash
# What moves RRM's transfer (docs/methods/rrm.md, "What we tried"): students of the Fashion-MNIST teacher of
# rrm_transfer.sh, in its setting (first 10000 training images, 10 epochs, Adam triangle LR to 5e-3, batch 100),
# one knob changed at a time; PGD-20 (step 0.01) and clean accuracy on the first 1000 test images, a quick read.
#
#   scripts/sweeps/rrm_knobs.sh [DATA_ROOT] [OUT] [TEACHER]
#   # defaults: ../shared/data, multirun/rrm_knobs, multirun/rrm/fashion_mnist/teacher_pgd10/checkpoints/last.pt
#
# Rerunning skips finished jobs. One core: OMP_NUM_THREADS=1.
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-multirun/rrm_knobs}
TEACHER=${3:-multirun/rrm/fashion_mnist/teacher_pgd10/checkpoints/last.pt}
if [ ! -f "$TEACHER" ]; then
  echo "rrm_knobs.sh: no teacher checkpoint at $TEACHER; run scripts/sweeps/rrm_transfer.sh first" >&2; exit 2
fi
common=(dataset=fashion_mnist "dataset.root=$DATA" dataset.train_subset=10000 trainer.epochs=10 trainer.batch_size=100
        optim=mnist/adam schedule=cyclic trainer.eps_warmup=0.3 "attack=[pgd20]" eval.n=1000 logger=none
        trainer.progress=lines seed=0 method=rrm "method.teacher=$TEACHER")
run() {  # run LABEL OVERRIDES...
  local label=$1; shift
  if [ -f "$OUT/$label/results.json" ]; then echo "$OUT/$label: already finished"; return; fi
  advtrain "${common[@]}" "$@" "hydra.run.dir=$OUT/$label"
}
run head_cos_w005 arch=madry_cnn                                            # the paper's L-inf setting
run lossonly_cos_w005 arch=madry_cnn method.head_on_projection=false        # advtrain's first layout
run head_rel_l2_w005 arch=madry_cnn method.feature_loss=rel_l2
run head_cos_w0 arch=madry_cnn method.w_xent=0
run head_cos_w05 arch=madry_cnn method.w_xent=0.05
run head_rel_l2_w005_e30 arch=madry_cnn method.feature_loss=rel_l2 trainer.epochs=30
run head_rel_l2_w005_crop2 arch=madry_cnn method.feature_loss=rel_l2 dataset.crop_padding=2  # random 2-pixel shifts
run same_arch_cos_w005 arch=mnist_net                                       # the teacher's own architecture
run same_arch_rel_l2_w005 arch=mnist_net method.feature_loss=rel_l2
advtrain-report "$OUT"
