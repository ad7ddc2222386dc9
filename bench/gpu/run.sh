#!/usr/bin/env bash
# The GPU kit: everything lavis-cprd checks on one GPU, in one device call of under 8 minutes,
# random weights only (nothing is downloaded there). Writes to $OUT: summary.json (each
# step's status, exit code, seconds, limit, and the JSON it produced) and logs.tar.gz (every
# log and JSON). Exits 0 whatever failed: summary.json's `all_passed` and `passed` say what did.
#
#   bash bench/gpu/build_wheels.sh                  # here, once: bench/gpu/wheels/ (ignored)
#   device run, carry ["bench/gpu/wheels"], timeout_s 560:
#       bash bench/gpu/run.sh
#   bash bench/gpu/run.sh --small                   # (or KIT_SMALL=1) the CPU rehearsal: tiny sizes
#
# Steps, each with a time limit of its own (cut to what is left of KIT_BUDGET_S), so one
# failure or hang loses only itself:
#   install          the carried wheels into $KIT_SITE (default /tmp/site), ahead on PYTHONPATH
#   env              versions and locations (transformers must be 4.36.x), `import lavis`
#   grad_ckpt        ViT gradient checkpointing under bf16 autocast: ours recomputes in bf16
#                    with the plain gradients; LAVIS's fairscale wrapper shown beside it
#   smoke            torchrun train (tiny config, distilling from epoch 0), killed after its
#                    first checkpoint_latest.pth, --resume auto to the end (val, test), then
#                    lavis-cprd evaluate --ckpt best: metrics must equal the run's test metrics
#   step_breakdown   BLIP-base CPRD step, each variant alone: ITC, online, cached, fp32 vs bf16,
#                    ViT checkpointing (the config's last 4 blocks) on/off; breakdown of online bf16
#   teacher_cost     the teacher's cost per step: none, online, cached (BLIP-base, bf16 teacher)
#   retrieval        student vs LAVIS's two-stage blip_retrieval at BLIP-base widths
#   step_breakdown_compile  the online bf16 step compiled (compile off is in step_breakdown)
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
SITE="${KIT_SITE:-/tmp/site}"
SMALL="${KIT_SMALL:-0}"
for arg in "$@"; do
  case "$arg" in
    --small) SMALL=1 ;;
    *) echo "unknown argument: $arg (only --small)" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$REPO/bench/gpu/out}"
WORK="${KIT_WORK:-/tmp/lavis_cprd_kit}"
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK/logs" "$WORK/json"
STEPS="$WORK/steps.jsonl"
START=$(date +%s)
since() {  # seconds since a `date +%s%N` reading, to a tenth
  local ms=$((($(date +%s%N) - $1) / 1000000))
  printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

# ---- install: the one line (wheels from bench/gpu/build_wheels.sh) --------------------------
t0=$(date +%s%N)
if ls bench/gpu/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" bench/gpu/wheels/*.whl \
    > "$WORK/logs/install.log" 2>&1
  rc=$?
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no bench/gpu/wheels/*.whl: using the environment's own packages" > "$WORK/logs/install.log"
  rc=0
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
printf '{"step": "install", "status": "%s", "rc": %d, "seconds": %s, "timeout_s": null}\n' \
  "$([ $rc = 0 ] && echo passed || echo failed)" "$rc" "$(since "$t0")" >> "$STEPS"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export LAVIS_CACHE_ROOT="$WORK/cache" TORCHINDUCTOR_CACHE_DIR="$WORK/inductor" MPLBACKEND=Agg
if [ "$SMALL" = 1 ]; then
  MODE=small-cpu DEV=cpu BUDGET="${KIT_BUDGET_S:-1500}"
  export CUDA_VISIBLE_DEVICES=""
else
  MODE=gpu DEV=cuda BUDGET="${KIT_BUDGET_S:-460}"
fi
DEADLINE=$((START + BUDGET))

finish() {
  "$PY" bench/gpu/kit_report.py summary --steps "$STEPS" --json-dir "$WORK/json" --out "$OUT/summary.json" \
    --mode "$MODE" || echo '{"all_passed": false, "error": "the summary failed"}' > "$OUT/summary.json"
  cp "$STEPS" "$WORK/json/" 2>/dev/null
  (cd "$WORK" && tar czf "$OUT/logs.tar.gz" logs json smoke/*.log 2>/dev/null)
  echo "wrote $OUT/summary.json and $OUT/logs.tar.gz ($(($(date +%s) - START)) s in all)"
}
trap finish EXIT

# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, its output in logs/NAME.log
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    printf '{"step": "%s", "status": "skipped", "rc": null, "seconds": 0, "timeout_s": 0}\n' "$name" >> "$STEPS"
    echo "== $name: skipped (${left} s left of the ${BUDGET} s budget)"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s): $*"
  local t0 rc status
  t0=$(date +%s%N)
  timeout -k 15 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=passed ;;
    124|137) status=timed_out ;;
    *) status=failed ;;
  esac
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %s, "timeout_s": %d}\n' \
    "$name" "$status" "$rc" "$(since "$t0")" "$limit" >> "$STEPS"
  echo "   $status (rc $rc)"
  [ "$status" = passed ] || tail -n 15 "$WORK/logs/$name.log" | sed 's/^/   | /'
}

J="$WORK/json"
if [ "$SMALL" = 1 ]; then
  BREAKDOWN=(--size tiny --device cpu --batch-size 8 --k 2 --steps 1 --warmup 1)
  TEACHER=(--size tiny --device cpu --batch-size 8 --steps 1 --warmup 0)
  RETRIEVAL=(--size tiny --device cpu --images 6 --captions-per-image 2 --k-test 3 --batch-size 4)
  SMOKE=(--small)
else
  BREAKDOWN=(--size base --device cuda --batch-size 32 --k 8 --steps 5 --warmup 2)
  TEACHER=(--size base --device cuda --precision bf16 --batch-size 32 --steps 5 --warmup 2)
  RETRIEVAL=(--size base --device cuda --images 64 --captions-per-image 5 --k-test 128 --batch-size 32)
  SMOKE=()
fi

step env 60 "$PY" bench/gpu/kit_report.py env --json "$J/env.json"
step grad_ckpt 60 "$PY" bench/gpu/grad_ckpt_check.py --device "$DEV" --json "$J/grad_ckpt.json"
step smoke 180 "$PY" bench/gpu/smoke.py --work "$WORK/smoke" --json "$J/smoke.json" --timeout 165 "${SMOKE[@]}"
step step_breakdown 170 "$PY" bench/step_breakdown.py "${BREAKDOWN[@]}" \
  --variants fused+bf16+itc,fused+bf16,fused+bf16+cached,fused,fused+bf16+ckpt --breakdown fused+bf16 \
  --json "$J/step_breakdown.json"
step teacher_cost 90 "$PY" bench/teacher_cost.py "${TEACHER[@]}" --json "$J/teacher_cost.json"
step retrieval 120 "$PY" bench/retrieval.py "${RETRIEVAL[@]}" --json "$J/retrieval.json"
step step_breakdown_compile 170 "$PY" bench/step_breakdown.py "${BREAKDOWN[@]}" \
  --variants fused+bf16+compile --json "$J/step_breakdown_compile.json"
exit 0
