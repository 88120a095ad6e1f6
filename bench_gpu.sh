#!/usr/bin/env bash
# The GPU measurement table of the scale issue, in one go on one GPU (about 8 minutes):
# record architecture, synthetic data, random encoders of the real sizes.
#   bash bench_gpu.sh [OUT_DIR]       -> OUT_DIR/summary.txt and one run folder per row
set -u
out=${1:-runs/bench_gpu}
mkdir -p "$out"
steps=${BENCH_STEPS:-10}
row() {  # name, then constants; LAUNCH may name another launcher (torchrun)
  local name=$1; shift
  echo "== $name: ${LAUNCH:-python} $*" | tee -a "$out/summary.txt"
  timeout 240 ${LAUNCH:-python} train_gpt_style.py preset=record bench=$steps run_dir="$out/$name" "$@" 2>&1 \
    | grep -E "^bench|^memory|^FSDP|error|Error" | tee -a "$out/summary.txt"
}
: > "$out/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/summary.txt"
row compiled compile=1
row eager compile=0
row eager_no_tread compile=0 tread_frac=0
row mb16_mb16 compile=0 stage1.micro_batch=16 stage2.micro_batch=16
row mb64_mb32 compile=0 stage1.micro_batch=64 stage2.micro_batch=32
row mb128 compile=0 stages=1 stage1.micro_batch=128
row mb128_mb32_recompute compile=0 stage1.micro_batch=128 stage2.micro_batch=32 recompute=0-9
row compiled_no_tread compile=1 tread_frac=0
row compiled_cudnn compile=1 sdpa=cudnn,efficient,math  # cuDNN attention first (PyTorch ranks it after flash and efficient)
# FSDP2 on NCCL with the compiled DiT (one process: the code path of the 8-GPU run, without the communication)
LAUNCH="torchrun --standalone --nproc_per_node=1" row fsdp_compiled compile=1 stages=1
echo "done: $out/summary.txt"
