"""Benchmark: LoRA training steps of the full-size transformer at production shapes, our paths against the baselines.

Builds the full-size LTX-2.3 (or LTX-2) transformer with random weights in bf16 on the GPU (speed does not depend on
weight values), injects rank-32 LoRA adapters (fp32) into to_q/to_k/to_v/to_out.0/ff.net.0.proj/ff.net.2 of all
streams, and times the training step the trainer runs (trainer.modes: text-to-audio-video inputs with a sigma per
modality, bf16 autocast, backward, fused AdamW) at 121 frames of 512x768 (6144 video tokens; `--tokens 14720` for
1280x736), 5 s of audio (126 tokens), 1024 text tokens, batch 1. Each variant runs in its own process (clean memory
statistics; an out-of-memory variant is reported, not fatal) and reports the median step time of the timed steps
after warm-up, the peak GPU memory, and model FLOPs utilisation against the card's bf16 matmul rate measured in the
same run. Attention runs on cuDNN SDPA in every variant (flash or memory-efficient SDPA where cuDNN refuses).

Variants:
  eager-ckpt        diffusers + PEFT, eager, every block checkpointed (the usual setup)
  compiled-ckpt     every block compiled (`compile_repeated_blocks`), every block checkpointed
  compiled          compiled, nothing checkpointed (needs ~114 GiB at 6144 tokens: H200 only)
  compiled-ckptK    compiled, the first K of the 48 blocks checkpointed (e.g. compiled-ckpt24)
  compiled-budgetX  compiled, nothing checkpointed, the compiler's activation memory budget X (e.g. compiled-budget0.5)
  and combinations such as compiled-ckpt20-budget0.5 (20 blocks checkpointed, the others under the budget);
  a `-triton` part routes attention through our fused Triton kernel (kernels: triton), e.g. compiled-ckpt-triton

    python scripts/bench_step.py --variants eager-ckpt,compiled-ckpt,compiled-budget0.5 --steps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from torch.nn.attention import SDPBackend

from trainer.lora import inject_lora, lora_parameters
from trainer.models.registry import TARGETS, build_random_transformer
from trainer.modes import build_step_inputs, compute_loss
from trainer.performance import checkpoint_blocks, compile_blocks

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
# 121 frames -> 16 latent frames; (latent rows, columns) per video token count.
GRIDS = {6144: (16, 16, 24), 14720: (16, 23, 40)}
AUDIO_TOKENS, TEXT_TOKENS = 126, 1024
# cuDNN first; flash / memory-efficient only where cuDNN does not take the inputs.
ATTENTION_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def batch_for(target, tokens: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    frames, height, width = GRIDS[tokens]
    batch = {
        "video_latents": torch.randn(1, 128, frames, height, width, generator=g),
        "audio_latents": torch.randn(1, 8, AUDIO_TOKENS, 16, generator=g),
        "video_text_embeds": torch.randn(1, TEXT_TOKENS, target.video_text_dim, generator=g),
        "audio_text_embeds": torch.randn(1, TEXT_TOKENS, target.audio_text_dim, generator=g),
        "text_mask": torch.ones(1, TEXT_TOKENS, dtype=torch.long),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["fps"] = 24.0
    return batch


def matmul_tflops(device: torch.device) -> float:
    """The card's bf16 matmul rate on random data (8192^3, median of 20 after warm-up)."""
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1000)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def model_flops(model, inputs) -> tuple[float, float]:
    """FLOPs of one training step as the model defines it (no recomputation): the forward's matrix products and
    attention counted by torch's FlopCounterMode; the backward of a frozen Linear needs only the input gradient (as
    much as its forward), attention's backward 2.5x its forward."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16), counter:
        model(**inputs.model_kwargs)
    attention = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "attention" in str(op))
    matmuls = counter.get_total_flops() - attention
    return 2 * matmuls + 3.5 * attention, 3.5 * attention


def apply_variant(model, name: str) -> None:
    """`eager` or `compiled`, then optional parts: `ckpt` (every block) or `ckptK` (the first K blocks) checkpointed,
    `budgetX` the compiler's activation memory budget, `triton` our fused attention (kernels: triton), e.g.
    compiled-ckpt20-budget0.5."""
    mode, *parts = name.split("-")
    if mode not in ("eager", "compiled"):
        raise SystemExit(f"unknown variant {name!r}: starts with eager or compiled")
    budget = 1.0
    for part in parts:
        if part.startswith("ckpt"):
            checkpoint_blocks(model, int(part[4:]) if part[4:] else len(model.transformer_blocks))
        elif part.startswith("budget") and mode == "compiled":
            budget = float(part[6:])
        elif part == "triton":
            from kernels.install import install_attention

            install_attention(model)
        else:
            raise SystemExit(f"unknown part {part!r} of variant {name!r}")
    if mode == "compiled":
        compile_blocks(model, budget)


def run_variant(name: str, target_name: str, tokens: int, warmup: int, steps: int) -> dict:
    from torch.nn.attention import sdpa_kernel

    device = torch.device("cuda")
    target = TARGETS[target_name]
    started = time.perf_counter()
    model = build_random_transformer(target, seed=0, dtype=torch.bfloat16, device=device)
    inject_lora(model, 32, 32.0, 0.0, LORA_TARGETS)
    params = lora_parameters(model)
    inputs = build_step_inputs(batch_for(target, tokens, device), "text-to-audio-video",
                               torch.Generator().manual_seed(0))
    with sdpa_kernel(ATTENTION_BACKENDS, set_priority=True):
        flops, attention_flops = model_flops(model, inputs)
    apply_variant(model, name)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    built = time.perf_counter() - started

    def step() -> None:
        # The backward too: a checkpointed block recomputes its forward there, with the same attention backend.
        with sdpa_kernel(ATTENTION_BACKENDS, set_priority=True):
            with torch.autocast("cuda", torch.bfloat16):
                loss, _ = compute_loss(model, inputs)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {"variant": name, "tokens": tokens, "step_s": statistics.median(times), "steps": times,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "model_tflop": flops / 1e12,
            "attention_tflop": attention_flops / 1e12,
            "build_s": built, "warmup_s": warm}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="ltx-2.3", choices=["ltx-2.3", "ltx-2"])
    parser.add_argument("--variants", default="eager-ckpt,compiled-ckpt,compiled")
    parser.add_argument("--tokens", default="6144", help="video token counts, e.g. 6144,14720")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if args.one:
        result = run_variant(args.one, args.target, int(args.tokens), args.warmup, args.steps)
        print("RESULT " + json.dumps(result), flush=True)
        return

    import diffusers
    import peft

    device = torch.device("cuda")
    rate = matmul_tflops(device)
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"peft {peft.__version__}; bf16 matmul {rate:.0f} TFLOP/s; target {args.target}, LoRA r32 on "
          f"{', '.join(LORA_TARGETS)}, {AUDIO_TOKENS} audio / {TEXT_TOKENS} text tokens, batch 1", flush=True)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for name in args.variants.split(","):
            command = [sys.executable, __file__, "--one", name, "--target", args.target, "--tokens", str(tokens),
                       "--warmup", str(args.warmup), "--steps", str(args.steps)]
            done = subprocess.run(command, capture_output=True, text=True)
            found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if found:
                result = json.loads(found[-1].removeprefix("RESULT "))
                result["mfu"] = result["model_tflop"] / result["step_s"] / rate
                rows.append(result)
                print(json.dumps(result), flush=True)
            else:
                reason = "out of memory" if "OutOfMemoryError" in done.stderr else done.stderr.strip()[-1500:]
                rows.append({"variant": name, "tokens": tokens, "error": reason})
                print(f"{name} at {tokens} tokens failed: {reason}", flush=True)

    print("\n| video tokens | variant | step s (median) | peak GiB | MFU | model TFLOP/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['tokens']} | {r['variant']} | {r['error'][:40]} | | | |")
        else:
            print(f"| {r['tokens']} | {r['variant']} | {r['step_s']:.3f} | {r['peak_gib']:.1f} | {r['mfu']:.0%} | "
                  f"{r['model_tflop']:.0f} |")


if __name__ == "__main__":
    main()
