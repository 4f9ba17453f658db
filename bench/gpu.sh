#!/usr/bin/env bash
# The overhead benchmark on a GPU, plus the check that steps which log nothing never synchronise
# with the host (torch.cuda sync debug mode "error" around them). Run from the repository root on a
# machine with CUDA, after `make .venv/bin/gradexp` (or any environment with gradexp installed):
#   bash bench/gpu.sh            # writes bench/results/overhead-cuda.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" bench/overhead.py --device cuda --check-sync --json bench/results/overhead-cuda.json "$@"
