#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything fastwam needs.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it skips work when nothing changed).
#
# Torch: on a CPU machine `pip install torch==2.13.0` takes the CPU wheel; a plain `torch` requirement would pull a
# multi-GB CUDA build. Set FASTWAM_TORCH to choose another build, e.g. FASTWAM_TORCH="torch==2.13.0" with a CUDA
# index (see README "GPU install").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTWAM_VENV:-$ROOT/.venv}"
TORCH_SPEC="${FASTWAM_TORCH:-torch==2.13.0}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.fastwam-setup"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing $TORCH_SPEC and fastwam[all] into $VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[all]"
  # The reference openpi client (tests check wire compatibility). Its metadata pins numpy<2 although its code is
  # pure Python, so it is installed without dependencies (docs/reference.md); typing_extensions comes with torch.
  "$VENV/bin/python" -m pip install --quiet --no-deps "openpi-client==0.1.2"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
