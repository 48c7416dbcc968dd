#!/usr/bin/env bash
# A first, one-seed look at acting in real time (issue "Acting in real time"): few-step sampling (plain and
# distilled) and asynchronous execution (naive switching vs real-time chunking) on ONE trained model of the
# video-prior study, the MT10 evaluation of that study (2 evaluation seeds x 5 layouts x 10 tasks = 100 episodes per
# condition). Resumable: a finished evaluation (results.json) is skipped, distillation resumes from its checkpoint.
#   bash scripts/realtime_pilot.sh [MODEL_RUN] [OUT]
# then: python scripts/realtime_pilot_table.py OUT
set -euo pipefail
MODEL=${1:-runs/video_prior/runs/prior40/fast_s0}
OUT=${2:-runs/realtime_pilot}
EVAL=(--tasks mt10 --episodes 5 --seeds 0,1 --replan 8 --max-steps 150 --workers 1 --videos 0 --threads 1
      --no-progress)
mkdir -p "$OUT"

evaluate() {  # NAME CHECKPOINT [eval options...]
  local name=$1 ckpt=$2; shift 2
  if [ -f "$OUT/$name/results.json" ]; then echo "[pilot] $name: done already"; return; fi
  echo "[pilot] $name: $(date +%H:%M:%S) start"
  fastwam eval metaworld --checkpoint "$ckpt" --out "$OUT/$name" "${EVAL[@]}" "$@" > "$OUT/$name.log" 2>&1
  echo "[pilot] $name: $(date +%H:%M:%S) done"
}

distill() {  # N
  local n=$1
  echo "[pilot] distill ${n}-step: $(date +%H:%M:%S) start"
  fastwam distill --checkpoint "$MODEL" --out "$OUT/distill$n" --steps "$n" --train-steps 500 --auto-resume \
    --no-progress > "$OUT/distill$n.log" 2>&1
  echo "[pilot] distill ${n}-step: $(date +%H:%M:%S) done"
}

distill 1
evaluate distilled1 "$OUT/distill1"
evaluate steps1 "$MODEL" --steps 1
evaluate steps2 "$MODEL" --steps 2
evaluate async_naive4 "$MODEL" --async --chunking naive --inference-delay 4
evaluate async_rtc4 "$MODEL" --async --chunking rtc --inference-delay 4
distill 2
evaluate distilled2 "$OUT/distill2"
evaluate steps4 "$MODEL" --steps 4
evaluate steps10 "$MODEL"
evaluate async_naive2 "$MODEL" --async --chunking naive --inference-delay 2
evaluate async_rtc2 "$MODEL" --async --chunking rtc --inference-delay 2
evaluate distilled1_async_rtc4 "$OUT/distill1" --async --chunking rtc --inference-delay 4
echo "[pilot] all done"
