#!/usr/bin/env bash
# On a GPU machine: run the GPU tests, then every kernel benchmark at full size,
# writing logs and CSVs to one folder (default $OUT, else runs/gpu_check).
# Usage: bash bench/gpu_check.sh [OUTPUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=.
python -m pytest -q tests/test_kernels.py tests/test_gta_loss.py tests/test_fused_linear.py tests/test_projection.py 2>&1 | tee "$out/gpu_tests.log"
for script in bench/bench_*.py; do
    name=$(basename "$script" .py)
    python "$script" --csv "$out/$name.csv" 2>&1 | tee "$out/$name.log"
done
