#!/usr/bin/env bash
# Evaluate a trained student on coco test: bash run_scripts/eval_cprd_coco.sh path/to/checkpoint_best.pth
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt=${1:?usage: $0 CHECKPOINT [--options ...]}; shift
python -m torch.distributed.run --nproc_per_node="${NPROC:-1}" -m lavis_cprd.apps.evaluate \
  --cfg-path configs/cprd_coco_blip_base.yaml --ckpt "$ckpt" "$@"
