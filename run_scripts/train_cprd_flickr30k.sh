#!/usr/bin/env bash
# CPRD fine-tuning of a BLIP-base dual encoder on flickr30k. NPROC GPUs (default 8); extra args go
# to the entry point, e.g. --options run.batch_size_train=16
set -euo pipefail
cd "$(dirname "$0")/.."
python -m torch.distributed.run --nproc_per_node="${NPROC:-8}" -m lavis_cprd.apps.train \
  --cfg-path configs/cprd_flickr30k_blip_base.yaml "$@"
