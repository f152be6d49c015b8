#!/usr/bin/env bash
# The prepared GPU check (issue 27): CUDA tests, an evaluation cell with N networks stacked, the
# training and distillation benchmarks, zoo model-epochs/s and peak GPU memory per phase, then ONE
# table (benchmarks/device_check.py says what each phase runs).
#
#   bash scripts/device_check.sh             # ~5 min on one H200 (every phase has its own time limit)
#   bash scripts/device_check.sh --quick     # ~2.5 min
#   bash scripts/device_check.sh --dry-run   # CPU, tiny sizes (the test suite runs this)
#
# Runs from a plain checkout: PYTHONPATH=. (no pip install), only dsdm/ and benchmarks/ code, no
# Ray/MLflow/Optuna. Writes every phase's log, device_check.json and device_check.md to $OUT if
# set, else ./device_check_out. Exit status 1 if any phase failed or ran out of time.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/device_check_out}"
export OUT
mkdir -p "$OUT"
PYTHON="${PYTHON:-python}"
{
  echo "# $(date -u +%FT%TZ) $(uname -n): $PYTHON $("$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
} | tee "$OUT/environment.txt"
"$PYTHON" -m benchmarks.device_check --out "$OUT" "$@" 2>&1 | tee "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
