#!/usr/bin/env bash
# Re-examine CPRD's weight and valid_threshold at the fixed distillation temperature (val, seeds 0-1,
# trained and oracle teacher). Reuses the 3-seed compare's teacher and its default CPRD runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=output/exp
T=$OUT/compare/teacher/checkpoint_best.pth
common=(--teacher-ckpt "$T" --methods cprd --ks --oracle --seeds 0 1)
lavis-cprd compare "${common[@]}" --weights 0.5 2 --output $OUT/sweep_weight
for vt in 0.0 0.3; do
  lavis-cprd compare "${common[@]}" --weights --student-options model.distill.valid_threshold=$vt --output $OUT/sweep_vt$vt
done
