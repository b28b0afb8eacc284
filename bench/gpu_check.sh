#!/usr/bin/env bash
# The GPU check in one command, for a lent GPU machine (see bench/gpu_check.py for what it runs).
#   here:   mkdir -p .gpu_data && cp -r ../shared/data/mnist .gpu_data/   (real MNIST travels with `carry`)
#   device: bash bench/gpu_check.sh          (writes gpu.md, gpu.json, the MNIST grid and logs to $OUT)
#   CPU:    bash bench/gpu_check.sh --smoke  (tiny sizes: checks the script without a GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=python3
[ -x .venv/bin/python ] && [ -z "${OUT:-}" ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
OUT_DIR="${OUT:-bench/results}"
$PY bench/gpu_check.py --out "$OUT_DIR" "$@"
