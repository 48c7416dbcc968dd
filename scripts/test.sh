#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite on the CPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
python -m ruff check src tests examples   # lint (pyflakes, pycodestyle, import order): fails fast before the suite
exec python -m pytest -n "${FASTWAM_TEST_WORKERS:-2}" "$@"
