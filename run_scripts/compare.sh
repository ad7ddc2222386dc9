#!/usr/bin/env bash
# Every distillation method (and the CPRD paper's ablations) on the embedded default: shared
# teacher (the packaged one unless --teacher-ckpt or --retrain-teacher), 3 seeds, LAVIS's and
# the relevance-aware metrics. Extra args go to `lavis-cprd compare`
# (e.g. --methods none cprd kl --oracle cprd --seeds 0 --jobs 2).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
exec python -m lavis_cprd.apps.cli compare "$@"
