#!/usr/bin/env bash
# The GPU check (docs/systems.md#the-gpu-check): about 8 minutes on one H100/H200, compilation included.
#   bash bench_gpu.sh [OUT_DIR]   -> OUT_DIR/check.json, rewritten after every measurement, and each stage's log
# A machine without lpips or ftfy installs them from ./wheels, made beforehand where pip can download:
#   pip download --no-deps -d wheels lpips==0.1.4 ftfy wcwidth
# TOY=1: the same phases on the CPU demo's model, on any machine (the tests run it).
set -u
out=$(realpath -m "${1:-runs/gpu_check}")
cd "$(dirname "$0")"
py=${PYTHON:-python3}
"$py" -c "import lpips, ftfy" 2>/dev/null || "$py" -m pip install -q --no-index --find-links wheels lpips ftfy wcwidth
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
exec "$py" data_prep.py gpu-check --out "$out" --seconds "${CHECK_SECONDS:-480}" ${TOY:+--toy}
