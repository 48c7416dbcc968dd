#!/usr/bin/env bash
# The GPU checks of docs/full_scale.md ("Still to do on a GPU") in one command, sized for one 10-minute call on a
# lent H100 / H200 whose image has PyTorch but not fastwam's pure-Python CLI dependencies.
#
# Before the call, on a machine with pip access, fetch the wheels it lacks into .whl/ (ignored by git):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl tyro==1.0.17 docstring-parser typeguard
# then run `bash scripts/gpu_check.sh` there (carrying .whl). Reports land in $OUT (default runs/gpu_check):
#   gpu.txt                 the card, its memory and driver
#   latency_eager.json      bench latency, libero_2cam224, bf16, batch 1, 10 steps: fast / joint / idm
#   latency_compiled.json   the same with --compile (CUDA graphs); max_abs_diff_vs_eager per mode
#   latency_steps.json      compiled fast path at 1, 2, 4 and 10 denoising steps, and with RTC guidance (the
#                           real-time target: one-step fast path p50 <= 8 ms on an H100)
#   tests.txt               the model contract tests (they pick the CPU; this checks the image's torch)
# Each step has its own time limit so that a slow compile cannot eat the others' time.
set -uo pipefail
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

bench() { python3 -m fastwam bench latency --preset libero_2cam224 --json "$@"; }
timeout 120 bench --out "$OUT/latency_eager.json" | tail -40
timeout 300 bench --compile --out "$OUT/latency_compiled.json" | tail -40
timeout 240 bench --compile --modes fast --step-counts 1,2,4,10 --rtc --out "$OUT/latency_steps.json" | tail -60
timeout 120 python3 -m pytest -p no:cacheprovider -x tests/fastwam_test.py tests/attention_test.py \
    tests/compile_test.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
