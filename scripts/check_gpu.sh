#!/usr/bin/env bash
# Checks the CUDA path on a GPU machine. Steps (all by default, or those named as arguments):
#   tests       the test suite with CUDA visible (bf16, fused AdamW, preprocessing on the GPU)
#   smoke       a bf16 smoke run on one GPU
#   ddp         with two or more GPUs: the same run under DDP through `accelerate launch`
#   preprocess  with two or more GPUs: the demo data preprocessed by one process and, into another cache, by two
#               (`accelerate launch`); the caches must hold the same samples with the same latents
# Logs go to $OUT (or ./gpu-check); run directories to a temporary folder.
set -euo pipefail
out=${OUT:-gpu-check}
work=$(mktemp -d)
steps=${*:-tests smoke ddp preprocess}
gpus=$(nvidia-smi -L | wc -l)
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpus.txt"
python -c "import torch, diffusers, peft, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpus.txt"

smoke() {  # smoke NAME [launcher...]: trains configs/smoke.yaml, keeps the log and metrics
    local name=$1; shift
    "$@" -m trainer.cli train configs/smoke.yaml --set output_dir="$work/$name" --set data.cache_dir="$work/cache" \
        --set data.source="$work/demo" 2>&1 | tr '\r' '\n' | grep -v '^train: ' | tee "$out/$name.log"
    cp "$work/$name/metrics.jsonl" "$out/$name-metrics.jsonl"
}

for step in $steps; do
    case $step in
    tests) python -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$out/pytest.log" || true ;;
    smoke) smoke one-gpu python ;;
    ddp) [ "$gpus" -ge 2 ] && smoke ddp accelerate launch --multi_gpu --num_processes 2 ;;
    preprocess)
        [ "$gpus" -ge 2 ] || continue
        for procs in 1 2; do
            accelerate launch --num_processes $procs $([ $procs -gt 1 ] && echo --multi_gpu) -m trainer.cli \
                preprocess configs/smoke.yaml --set data.source="$work/demo" --set data.cache_dir="$work/cache-$procs" \
                2>&1 | tr '\r' '\n' | grep -v 'it/s\]$' | tee "$out/preprocess-$procs.log"
        done
        python scripts/compare_caches.py "$work/cache-1" "$work/cache-2" 2>&1 | tee "$out/preprocess-compare.log" ;;
    *) echo "unknown step $step (tests, smoke, ddp, preprocess)"; exit 2 ;;
    esac
done
