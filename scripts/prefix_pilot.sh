#!/usr/bin/env bash
# Pilot: training-time action conditioning (train.action_prefix_max) against inference-time RTC guidance, on the
# real-time study's trained fast models (runs/video_prior, cells and seeds as given). For each model:
#   1. fine-tune it for STEPS steps with --config.train.action-prefix-max PREFIX (init-action copy, same data,
#      peak lr 1e-4: a fifth of the training peak, as for a fine-tune);
#   2. evaluate the tuned model synchronously and asynchronously with rtc at each delay (its policy picks prefix
#      conditioning: no guidance), with the same MT10 layouts as the real-time study.
# The original models' guided-rtc numbers at the same delays come from runs/realtime; PREFIX=0 is the control (the
# same fine-tune without the prefix objective; its rtc is guidance). python scripts/prefix_pilot_table.py tabulates. Every stage is skipped when its
# output exists, so re-running the script resumes it. Usage:
#   [OUT=runs/prefix_pilot] [CELLS="prior40 scratch40"] [SEEDS="0 1 2"] [DELAYS="1 2 4 8"] bash scripts/prefix_pilot.sh
set -euo pipefail
OUT=${OUT:-runs/prefix_pilot}
CELLS=${CELLS:-prior40}
SEEDS=${SEEDS:-0}
DELAYS=${DELAYS-1 2 4 8}  # DELAYS="" evaluates synchronously only
PREFIX=${PREFIX:-8}
STEPS=${STEPS:-500}
SOURCE=${SOURCE:-runs/video_prior}
EVAL=(--tasks mt10 --episodes 5 --seeds 0,1 --replan 8 --max-steps 150 --workers 1 --videos 0 --threads 1
      --no-progress)
for cell in $CELLS; do
  for seed in $SEEDS; do
    src="$SOURCE/runs/$cell/fast_s$seed"
    run="$OUT/runs/$cell/fast_p${PREFIX}_s$seed"
    if [ ! -f "$run/checkpoints/step_$(printf %07d "$STEPS")/model.safetensors" ]; then
      python -m fastwam train --preset small_cpu --config.train.batch-size 16 --config.train.save-every 250 \
        --dataset "$SOURCE/data" --init-from "$src" --init-action copy \
        --config.train.action-prefix-max "$PREFIX" --config.train.lr 0.0001 --variant fast --steps "$STEPS" \
        --config.train.seed "$seed" --config.train.threads 1 --out "$run" --auto-resume --no-progress
    fi
    ev="$OUT/eval/$cell/fast_p${PREFIX}_s$seed"
    [ -f "$ev/results.json" ] || python -m fastwam eval metaworld --checkpoint "$run" --mode fast --out "$ev" \
      "${EVAL[@]}"
    for d in $DELAYS; do
      [ -f "$ev/async_rtc$d/results.json" ] || python -m fastwam eval metaworld --checkpoint "$run" --mode fast \
        --out "$ev/async_rtc$d" "${EVAL[@]}" --async --chunking rtc --inference-delay "$d"
    done
  done
done
echo "done: $OUT"
