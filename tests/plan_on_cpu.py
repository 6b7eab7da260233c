"""`ltx-lora` planning its memory (`train.gradient_checkpointing: auto`) in CPU processes, for tests only: run it as
the training script of torchrun, or of `accelerate launch --config_file configs/accelerate/fsdp.yaml` (FSDP stays on
for CPU processes as in tests/fsdp_on_cpu.py).

A CPU has no allocator peak: the bytes autograd saves for the backward stand in for it, as in
tests/test_memory_plan.py, and the GPU has 1 TiB. With PLAN_OUT_OF_MEMORY_RANK=r, process r runs out of memory in the
probe that keeps blocks, so that the processes must agree on a plan they measured differently."""

import os
import sys
from types import SimpleNamespace

import fsdp_on_cpu  # noqa: F401  (keeps accelerate's FSDP plugin on for CPU processes)
import torch

import trainer.train as train_module

saved_bytes = 0
readings = 0


def _pack(tensor):
    global saved_bytes
    saved_bytes += tensor.numel() * tensor.element_size()
    return tensor


def _reset_peak(device=None):
    global saved_bytes
    saved_bytes = 0


def _peak(device=None):
    global readings
    readings += 1
    if readings == 2 and os.environ.get("RANK") == os.environ.get("PLAN_OUT_OF_MEMORY_RANK"):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    return saved_bytes


torch.cuda.reset_peak_memory_stats = _reset_peak
torch.cuda.max_memory_allocated = _peak
torch.cuda.get_device_properties = lambda device: SimpleNamespace(total_memory=2**40)
train_module.plans_memory = lambda cfg, device: cfg.train.gradient_checkpointing == "auto"
plan_blocks = train_module.plan_blocks


def _plan_blocks_printed(*args, **kwargs):
    """Each process prints its plan (only the first process logs it)."""
    plan = plan_blocks(*args, **kwargs)
    sys.stdout.write(f"PLAN of process {os.environ['RANK']}: {plan.describe()}\n")  # one write: lines stay whole
    sys.stdout.flush()
    return plan


train_module.plan_blocks = _plan_blocks_printed

if __name__ == "__main__":
    from trainer.cli import main

    with torch.autograd.graph.saved_tensors_hooks(_pack, lambda tensor: tensor):
        sys.exit(main(sys.argv[1:]))
