#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything fastwam needs.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it skips work when nothing changed).
#
# Torch, in this order:
#   1. FASTWAM_TORCH, when set: that requirement is installed, e.g. FASTWAM_TORCH="torch==2.15.0".
#   2. A torch already in the venv is kept, whatever its version or build.
#   3. A new venv made from an interpreter that has a CUDA torch (a GPU image) sees that torch
#      (--system-site-packages) and keeps it.
#   4. Otherwise torch==2.13.0. Where pip reaches only PyPI, that is the multi-GB CUDA build on Linux; for the CPU
#      wheel run once with FASTWAM_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
#      (On the project's CPU VMs pip's config serves torch==2.13.0 from a local CPU wheel.)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTWAM_VENV:-$ROOT/.venv}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
if [ ! -x "$VENV/bin/python" ]; then
  if [ -z "${FASTWAM_TORCH:-}" ] && "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null
  then
    echo "[setup] creating virtual environment $VENV on $PY's CUDA torch (--system-site-packages)"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    echo "[setup] creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
  fi
fi
STAMP="$VENV/.fastwam-setup"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1) ${FASTWAM_TORCH:-}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  HAVE="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
  if [ -n "${FASTWAM_TORCH:-}" ]; then
    echo "[setup] installing $FASTWAM_TORCH into $VENV"
    # shellcheck disable=SC2086  # the value may carry pip options (--index-url ...)
    "$VENV/bin/python" -m pip install --quiet $FASTWAM_TORCH
  elif [ -n "$HAVE" ]; then
    echo "[setup] keeping torch $HAVE"
  else
    echo "[setup] installing torch==2.13.0 into $VENV"
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
  fi
  echo "[setup] installing fastwam[all] into $VENV"
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[all]"
  # The reference openpi client (tests check wire compatibility). Its metadata pins numpy<2 although its code is
  # pure Python, so it is installed without dependencies (docs/reference.md); typing_extensions comes with torch.
  "$VENV/bin/python" -m pip install --quiet --no-deps "openpi-client==0.1.2"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
