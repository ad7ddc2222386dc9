#!/usr/bin/env bash
# docs/own_data.md, step by step, timed: a generated folder of pictures and a captions table
# to a served index. Usage: bash run_scripts/own_data_walkthrough.sh [WORK_DIR] [IMAGES]
# Writes WORK_DIR/times.tsv (step, seconds) and each step's output under WORK_DIR.
set -euo pipefail
WORK=${1:-output/own_data_walkthrough}
IMAGES=${2:-300}
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
rm -rf "$WORK"
mkdir -p "$WORK"
TIMES="$WORK/times.tsv"
step() {  # step NAME COMMAND...: run it, log it, record its wall time
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$WORK/$name.log" 2>&1 || { echo "step $name failed: see $WORK/$name.log"; tail -20 "$WORK/$name.log"; exit 1; }
  printf '%s\t%s\n' "$name" "$((SECONDS - t0))" | tee -a "$TIMES"
}
DATA="$WORK/prepared"
CFG="$DATA/experiment.yaml"
step 0_example    python -m lavis_cprd.datasets.example_folder "$WORK/example" --images "$IMAGES"
step 1_prepare    lavis-cprd prepare-data "$WORK/example/images" "$WORK/example/captions.csv" --output "$DATA" \
                    --extra-matches "$WORK/example/extra_matches.csv"
step 2_teacher    lavis-cprd train-teacher --data-cfg "$CFG"
step 3_diagnose   lavis-cprd diagnose --cfg-path "$CFG" --random-init --output "$WORK/diagnose"
step 4_train_cprd lavis-cprd train --cfg-path "$CFG"
step 4_train_itc  lavis-cprd train --cfg-path "$CFG" --options model.distill.loss=none run.output_dir="$DATA/runs/itc"
CPRD=$(ls -d "$DATA"/runs/cprd/*/ | tail -1)checkpoint_best.pth
ITC=$(ls -d "$DATA"/runs/itc/*/ | tail -1)checkpoint_best.pth
step 5_eval_cprd  lavis-cprd evaluate --cfg-path "$CFG" --ckpt "$CPRD" --options run.output_dir="$WORK/eval/cprd"
step 5_eval_itc   lavis-cprd evaluate --cfg-path "$CFG" --ckpt "$ITC" --options run.output_dir="$WORK/eval/itc"
step 5_eval_cprd_annotated_only lavis-cprd evaluate --cfg-path "$CFG" --ckpt "$CPRD" --options \
                    run.output_dir="$WORK/eval/cprd_annotated" \
                    datasets.flickr30k.build_info.annotations.test.storage="$DATA/annotations/test_annotated.json"
step 6_index      lavis-cprd index --cfg-path "$CFG" --ckpt "$CPRD" --images "$WORK/example/images" --output "$WORK/index"
step 6_search     lavis-cprd search --index "$WORK/index" "there is a red circle" "there is a small blue square to the left of a green triangle" --k 5
for run in cprd itc cprd_annotated; do
  printf '%s\t%s\n' "$run" "$(python -c "import json,glob,sys; m=json.load(open(glob.glob('$WORK/eval/$run/*/metrics.json')[0])); m=m.get('test', m); print({k: round(m[k], 2) for k in ('r_mean', 'rel_map_at_r', 'i2t_map_at_r', 't2i_map_at_r') if k in m})")" | tee -a "$WORK/metrics.tsv"
done
