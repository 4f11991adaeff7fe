#!/usr/bin/env bash
# scripts/gpu_check.py on a machine that has torch, torchvision, rich and matplotlib but no package index.
#
#   cp -r path/to/gpu-wheels .whl           # once: hydra-core, omegaconf, antlr4, pyautoattack, submitit, launchers
#   scripts/gpu_check.sh OUT [gpu_check.py options]
#
# Where hydra is missing, the wheels in $ADVTRAIN_WHEELS (default: .whl in the checkout) are installed into a
# folder of their own and put on PYTHONPATH; nothing else on the machine is touched. With `pip install -e .`
# done, this is just `python scripts/gpu_check.py OUT`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] || { echo "usage: scripts/gpu_check.sh OUT [gpu_check.py options]" >&2; exit 2; }
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  wheels=${ADVTRAIN_WHEELS:-$repo/.whl}
  if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: hydra-core is not installed and $wheels holds no wheels: copy the gpu-wheels folder there" >&2
    exit 2
  fi
  site=${TMPDIR:-/tmp}/advtrain-site
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 "$repo/scripts/gpu_check.py" "$@"
