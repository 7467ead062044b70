#!/usr/bin/env bash
# The GPU checks of the device input path, as one command (about 4 minutes on one H100/H200):
# the CUDA tests (device batches, precisions, resume) and bench_speed at the paper's sizes.
# Usage: bash bench/device_check.sh [OUT_DIR]   (PYTHON=... to choose the interpreter; needs pydicom)
set -o pipefail
out=${1:-bench/results}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L
timeout 240 "$py" -m pytest tests/test_speed.py tests/test_train.py -q -p no:cacheprovider \
    -k "cuda or device_batch or amp or bf16 or fit_options or optimisers" 2>&1 | tee "$out/pytest.log" | tail -25
timeout 300 "$py" bench/bench_speed.py --device cuda --out "$out/speed_cuda.json" 2>&1 | tee "$out/bench.log"
