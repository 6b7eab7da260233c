#!/usr/bin/env bash
# Checks the CUDA path on a GPU machine: the test suite with CUDA visible (bf16, fused AdamW), a bf16 smoke run on
# one GPU and, where there are two or more GPUs, the same run under DDP through `accelerate launch`.
# Logs go to $OUT (or ./gpu-check); run directories to a temporary folder.
set -euo pipefail
out=${OUT:-gpu-check}
work=$(mktemp -d)
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpus.txt"
python -c "import torch, diffusers, peft, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpus.txt"

python -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/pytest.log" || true

python -m trainer.cli train configs/smoke.yaml --set output_dir="$work/one-gpu" --set data.cache_dir="$work/cache" \
    2>&1 | tr '\r' '\n' | grep -v '^train: ' | tee "$out/one-gpu.log"
cp "$work/one-gpu/metrics.jsonl" "$out/one-gpu-metrics.jsonl"

gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -ge 2 ]; then
    accelerate launch --multi_gpu --num_processes 2 -m trainer.cli train configs/smoke.yaml \
        --set output_dir="$work/ddp" --set data.cache_dir="$work/cache" 2>&1 | tr '\r' '\n' | grep -v '^train: ' \
        | tee "$out/ddp.log"
    cp "$work/ddp/metrics.jsonl" "$out/ddp-metrics.jsonl"
fi
