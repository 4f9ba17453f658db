#!/usr/bin/env bash
# The GPU checks in one go, for a machine with CUDA: the CUDA tests (probes on the GPU against the
# CPU, a run end to end, no host synchronisation on steps that log nothing), then the overhead
# benchmark on the GPU (gradexp.watch beside the real wandb.watch and Lightning's grad_norm) with
# its own sync check. Needs wandb and lightning installed beside gradexp. From the repository root:
#   bash bench/gpu.sh                   # logs and JSON in bench/results/
#   RESULTS=/some/dir bash bench/gpu.sh
#   bash bench/gpu.sh --repeats 3 --cases mlp20x256   # extra arguments go to bench/overhead.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
RESULTS=${RESULTS:-bench/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), 'torch', torch.__version__)"
"$PY" -c "import wandb, lightning" || { echo "the benchmark needs wandb and lightning: pip install wandb lightning" >&2; exit 1; }
status=0  # a failing test does not stop the benchmark; the script fails at the end
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$RESULTS/test_cuda.log" || status=1
"$PY" bench/overhead.py --device cuda --check-sync --json "$RESULTS/overhead-cuda.json" "$@" 2>&1 \
    | tee "$RESULTS/overhead-cuda.log" || status=1
exit $status
