#!/usr/bin/env bash
# Every distillation method (and the CPRD paper's ablations) on the embedded default: shared
# teacher, 3 seeds, LAVIS metrics. Extra args go to `lavis-cprd compare`
# (e.g. --methods none cprd kl --seeds 0 --teacher-ckpt output/demo/teacher/checkpoint_best.pth).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
exec python -m lavis_cprd.cli compare "$@"
