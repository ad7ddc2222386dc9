#!/usr/bin/env bash
# Issue 34's fair contest, end to end (docs/contest/): every method tuned the same way on the
# embedded default's val split, then run on test with 3 seeds; the same winners, untouched,
# with a teacher of BLIP's standard recipe (in-batch ITM negatives) and on a second domain.
# Usage: bash run_scripts/contest.sh [OUT] [TRIALS]
set -euo pipefail
OUT=${1:-output/contest}
TRIALS=${2:-6}
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
METHODS=(none cprd margin_mse loopitr kl listmle_full conaclip)
mkdir -p "$OUT"
t() { local t0=$SECONDS; "$@"; printf '%s\t%s\n' "$*" "$((SECONDS - t0))" >> "$OUT/times.tsv"; }
# 1. the embedded default, the packaged teacher (verified ITM negatives): tuned, then 3 seeds on test
t lavis-cprd compare --output "$OUT/shapes" --methods "${METHODS[@]}" --weights --ks --oracle cprd --tune "$TRIALS"
TUNED="$OUT/shapes/results.json"
# 2. the same data, a teacher trained by BLIP's standard recipe (in-batch ITM negatives)
t lavis-cprd train-teacher --data-cfg lavis_cprd/configs/experiments/cprd_tiny_shapes.yaml --output "$OUT/inbatch_teacher"
t lavis-cprd compare --output "$OUT/shapes_inbatch" --teacher-ckpt "$OUT/inbatch_teacher/teacher/teacher_fp16.pth" \
    --methods "${METHODS[@]}" --weights --ks --oracle cprd --tuned-from "$TUNED"
# 3. a second domain (datasets.signs) through LAVIS's stock builder, nothing tuned on it
t python -m lavis_cprd.datasets.example_folder "$OUT/signs_data" --domain signs --images 900
t lavis-cprd prepare-data "$OUT/signs_data/images" "$OUT/signs_data/captions.csv" --output "$OUT/signs" \
    --extra-matches "$OUT/signs_data/extra_matches.csv" --val-size 150 --test-size 150 --overwrite
t lavis-cprd train-teacher --data-cfg "$OUT/signs/experiment.yaml"
t lavis-cprd compare --output "$OUT/signs_contest" --student-cfg "$OUT/signs/experiment.yaml" \
    --teacher-ckpt "$OUT/signs/teacher/teacher_fp16.pth" --methods "${METHODS[@]}" --weights --ks --tuned-from "$TUNED"
