#!/usr/bin/env bash
# The embedded default end to end: partial-caption data, the packaged teacher, students with
# ITC alone, CPRD (trained and oracle teacher) and the peer losses (3 seeds), evaluation,
# tables, figures. Extra args go to `lavis-cprd demo` (e.g. --seeds 0 --retrain-teacher).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
exec python -m lavis_cprd.apps.cli demo "$@"
