#!/usr/bin/env bash
# Evaluate a trained student on flickr30k test: bash run_scripts/eval_cprd_flickr30k.sh path/to/checkpoint_best.pth
set -euo pipefail
cd "$(dirname "$0")/.."
ckpt=${1:?usage: $0 CHECKPOINT [--options ...]}; shift
python -m torch.distributed.run --nproc_per_node="${NPROC:-1}" -m lavis_cprd.apps.evaluate \
  --cfg-path configs/cprd_flickr30k_blip_base.yaml --ckpt "$ckpt" "$@"
