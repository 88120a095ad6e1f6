#!/usr/bin/env bash
# The GPU measurement table of the scale issue, in one go on one GPU (about 8 minutes):
# record architecture, synthetic data, random encoders of the real sizes.
#   bash bench_gpu.sh [OUT_DIR]       -> OUT_DIR/summary.txt and one run folder per row
set -u
out=${1:-runs/bench_gpu}
mkdir -p "$out"
steps=${BENCH_STEPS:-10}
row() {  # name, then constants
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/summary.txt"
  timeout 240 python train_gpt_style.py preset=record bench=$steps run_dir="$out/$name" "$@" 2>&1 \
    | grep -E "^bench|error" | tee -a "$out/summary.txt"
}
: > "$out/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/summary.txt"
row compiled compile=1
row eager compile=0
row eager_no_tread compile=0 tread_frac=0
row mb16_mb16 compile=0 stage1.micro_batch=16 stage2.micro_batch=16
row mb64_mb32 compile=0 stage1.micro_batch=64 stage2.micro_batch=32
row mb128 compile=0 stages=1 stage1.micro_batch=128
row compiled_no_tread compile=1 tread_frac=0
echo "done: $out/summary.txt"
