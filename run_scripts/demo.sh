#!/usr/bin/env bash
# The embedded default end to end: data, teacher, baseline and CPRD students (3 seeds),
# evaluation, table, figure. Extra args go to `lavis-cprd demo` (e.g. --seeds 0 --output DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
exec python -m lavis_cprd.cli demo "$@"
