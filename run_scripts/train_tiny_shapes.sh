#!/usr/bin/env bash
# The embedded default on CPU (or one GPU): tiny CPRD student on generated cprd_shapes data.
# NPROC>1 launches that many processes. Extra args go to the entry point (--options ...).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
if [ "${NPROC:-1}" -gt 1 ]; then
  exec python -m torch.distributed.run --nproc_per_node="$NPROC" -m lavis_cprd.apps.train --cfg-path configs/cprd_tiny_shapes.yaml "$@"
fi
exec python -m lavis_cprd.apps.train --cfg-path configs/cprd_tiny_shapes.yaml "$@"
