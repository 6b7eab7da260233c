#!/usr/bin/env bash
# Checks the CUDA path on a GPU machine. Steps (all by default, or those named as arguments):
#   tests       the test suite with CUDA visible (bf16, fused AdamW, preprocessing on the GPU)
#   smoke       a bf16 smoke run on one GPU
#   ddp         with two or more GPUs: the same run under DDP through `accelerate launch`
#   preprocess  with two or more GPUs: the demo data preprocessed by one process and, into another cache, by two
#               (`accelerate launch`); the caches must hold the same samples with the same latents
#   fsdp        with two or more GPUs: one process accumulating 2 micro-batches against DDP and FSDP
#               (configs/accelerate/*.yaml) with 2 processes, the FSDP run stopped at step 10 and resumed; prints
#               the losses side by side and the LoRAs' largest relative difference (bf16: about 1e-3 expected);
#               the single-process run goes first, so it writes the demo data and the cache the others reuse
#   plan        train.gradient_checkpointing: auto (the memory plan) on one GPU and, with two or more, under DDP and
#               FSDP: the logs show the probes' measurements, the plan, and the first step's real peak beside the
#               predicted one
# Logs go to $OUT (or ./gpu-check); run directories to a temporary folder.
set -euo pipefail
out=${OUT:-gpu-check}
work=$(mktemp -d)
steps=${*:-tests smoke ddp preprocess fsdp plan}
gpus=$(nvidia-smi -L | wc -l)
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpus.txt"
python -c "import torch, diffusers, peft, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpus.txt"

smoke() {  # smoke NAME [launcher...]: trains configs/smoke.yaml, keeps the log and metrics
    local name=$1; shift
    "$@" -m trainer.cli train configs/smoke.yaml --set output_dir="$work/$name" --set data.cache_dir="$work/cache" \
        --set data.source="$work/demo" 2>&1 | stdbuf -oL tr '\r' '\n' | grep -v '^train: ' | tee "$out/$name.log"
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
    fsdp)
        [ "$gpus" -ge 2 ] || continue
        # Not compiled, to keep the four runs short (bench_step.py's -fsdp variants run compiled blocks under FSDP).
        same=(configs/smoke.yaml --set train.steps=20 --set train.log_every=1 --set train.checkpoint_every=10
              --set train.compile=false --set 'validation.prompts=[]' --set data.cache_dir="$work/cache"
              --set data.source="$work/demo")
        python -m trainer.cli train "${same[@]}" --set output_dir="$work/one" --set train.gradient_accumulation_steps=2
        for launcher in ddp fsdp; do
            accelerate launch --config_file configs/accelerate/$launcher.yaml -m trainer.cli train "${same[@]}" \
                --set output_dir="$work/$launcher" $([ $launcher = fsdp ] && echo --set train.steps=10)
        done
        accelerate launch --config_file configs/accelerate/fsdp.yaml -m trainer.cli train "${same[@]}" \
            --set output_dir="$work/fsdp" --resume
        python - "$work" <<'PY' 2>&1 | tee "$out/fsdp-compare.log"
import json, sys
from safetensors.torch import load_file
work = sys.argv[1]
runs = {r: [json.loads(l) for l in open(f"{work}/{r}/metrics.jsonl")] for r in ("one", "ddp", "fsdp")}
for a, b, c in zip(*runs.values()):
    print(a["step"], a["loss"], b["loss"], c["loss"])
one = load_file(f"{work}/one/smoke_lora.safetensors")
for r in ("ddp", "fsdp"):
    other = load_file(f"{work}/{r}/smoke_lora.safetensors")
    print(r, max(((other[k] - one[k]).norm() / one[k].norm()).item() for k in one))
PY
        ;;
    plan)
        auto=(-m trainer.cli train configs/smoke.yaml --set train.steps=20 --set train.gradient_checkpointing=auto
              --set 'validation.prompts=[]' --set data.cache_dir="$work/cache" --set data.source="$work/demo")
        python "${auto[@]}" --set output_dir="$work/plan" 2>&1 | stdbuf -oL tr '\r' '\n' | grep -v '^train: ' \
            | tee "$out/plan.log"
        [ "$gpus" -ge 2 ] || continue
        for launcher in ddp fsdp; do
            accelerate launch --config_file configs/accelerate/$launcher.yaml "${auto[@]}" \
                --set output_dir="$work/plan-$launcher" 2>&1 | stdbuf -oL tr '\r' '\n' | grep -v '^train: ' \
                | tee "$out/plan-$launcher.log"
        done ;;
    *) echo "unknown step $step (tests, smoke, ddp, preprocess, fsdp, plan)"; exit 2 ;;
    esac
done
