"""Benchmark: LoRA training steps of the full-size transformer at production shapes, our paths against the baselines.

Builds the full-size LTX-2.3 (or LTX-2) transformer with random weights in bf16 on the GPU (speed does not depend on
weight values), injects rank-32 LoRA adapters (fp32) into to_q/to_k/to_v/to_out.0/ff.net.0.proj/ff.net.2 of all
streams (the audio feed-forward included), and times the training step the trainer runs (trainer.modes: text-to-audio-video inputs with a sigma per
modality, bf16 autocast, backward, fused AdamW) at 121 frames of 512x768 (6144 video tokens; `--tokens 14720` for
1280x736), 5 s of audio (126 tokens), 1024 text tokens, batch 1. Each variant runs in its own process (clean memory
statistics; an out-of-memory variant is reported, not fatal) and reports the median step time of the timed steps
after warm-up, the peak GPU memory (allocated and reserved), and model FLOPs utilisation against the card's bf16 matmul rate measured in the
same run. Attention runs on cuDNN SDPA in every variant (flash or memory-efficient SDPA where cuDNN refuses).

Variants:
  ltxcore-eager-ckpt     the official implementation, ltx-core's LTXModel + PEFT, every block checkpointed, as the
                         official trainer runs it (scripts/ltx_core_step.py; needs ltx-core and einops installed)
  ltxcore-compiled-ckpt  the same with each block compiled
  eager-ckpt        diffusers + PEFT, eager, every block checkpointed (the usual setup)
  compiled-ckpt     every block compiled (`compile_repeated_blocks`), every block checkpointed
  compiled          compiled, nothing checkpointed (79 GiB at 6144 tokens)
  compiled-ckptK    compiled, the first K of the 48 blocks checkpointed (e.g. compiled-ckpt24)
  compiled-budgetX  compiled, nothing checkpointed, the compiler's activation memory budget X (e.g. compiled-budget0.5)
  and combinations such as compiled-ckpt20-budget0.5 (20 blocks checkpointed, the others under the budget);
  a `-triton` part routes attention through our fused Triton kernel (kernels: triton), e.g. compiled-ckpt-triton;
  a `-noagg` part turns off the partitioner's aggressive recomputation (on in the trainer: recompute every cheap
  elementwise op rather than keep its output), e.g. compiled-noagg; a `-pertoken` part passes the timesteps per
  token, as before they were given once per sample; a `-mask` part passes the all-ones text attention mask of the
  published connectors, which SDPA gets as an additive bias of zeros (the trainer passes none since 2026-11-27,
  fifth session: trainer.train.batch_to_device; earlier rounds passed it); a `-cg` part replays the compiled blocks
  as CUDA graphs;
  an `-autotune` part lets the compiler choose each matrix product's kernel by timing Triton templates against cuBLAS
  (inductor's max_autotune_gemm: the rank-32 LoRA products, and products with their elementwise epilogue fused);
  an `-fp8` part runs the frozen base Linears in fp8 (train.fp8), e.g. compiled-ckpt12-fp8; an `-ff` (or `-ffK`)
  part recomputes the video feed-forward's hidden activation in the blocks not checkpointed (the first K of them;
  train.recompute_feedforward), e.g. compiled-ff or compiled-ckpt4-ff; an `-off` (or `-offK`) part keeps the saved
  activations of the blocks not checkpointed (K of them, spread) in pinned host memory (train.offload_activations),
  e.g. compiled-off12; a `-plan` (or `-planX`) part lets the memory plan choose kept, offloaded and checkpointed
  blocks (train.gradient_checkpointing: auto) for a budget of 90% of the card (or X GiB), e.g. compiled-plan70, and
  prints the plan and its predicted peak beside the measured one.
  A `-ddp` or `-fsdp` part runs the variant on `--gpus` GPUs (default: all), one process each with a batch of 1,
  under DistributedDataParallel or FSDP2 (every block its own unit, as configs/accelerate/fsdp.yaml), and reports the
  scaling efficiency against the same variant on one GPU when that ran first: step time alone / step time on N GPUs
  (100%: N times the samples per second), e.g. --variants compiled-ckpt12,compiled-ckpt12-ddp,compiled-fsdp.
`--layers N` builds N blocks instead of 48 and `--profile` prints where one step's GPU time goes, e.g.

    python scripts/bench_step.py --variants ltxcore-eager-ckpt,compiled-ckpt,compiled-ckpt12,compiled --steps 3
    python scripts/bench_step.py --variants compiled,compiled-noagg --layers 12 --profile
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import psutil
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.lora import inject_lora, lora_parameters
from trainer.models.registry import TARGETS, build_random_transformer
from trainer.memory_plan import measure_block_memory, memory_budget, optimizer_state_bytes, plan_blocks
from trainer.modes import build_step_inputs, compute_loss
from trainer.performance import checkpoint_blocks, compile_blocks, recompute_feedforward
from trainer.train import batch_to_device

# The video feed-forward's names do not match the audio one's (`audio_ff.net.2`): both are listed.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj",
                "audio_ff.net.2"]
# 121 frames -> 16 latent frames; (latent rows, columns) per video token count.
GRIDS = {6144: (16, 16, 24), 14720: (16, 23, 40)}
AUDIO_TOKENS, TEXT_TOKENS = 126, 1024
# cuDNN first; flash / memory-efficient only where cuDNN does not take the inputs.
ATTENTION_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def batch_for(target, tokens: int) -> dict:
    """The benchmark's batch, on the host (as the data loader gives it to the trainer)."""
    g = torch.Generator().manual_seed(0)
    frames, height, width = GRIDS[tokens]
    batch = {
        "video_latents": torch.randn(1, 128, frames, height, width, generator=g),
        "audio_latents": torch.randn(1, 8, AUDIO_TOKENS, 16, generator=g),
        "video_text_embeds": torch.randn(1, TEXT_TOKENS, target.video_text_dim, generator=g),
        "audio_text_embeds": torch.randn(1, TEXT_TOKENS, target.audio_text_dim, generator=g),
        "text_mask": torch.ones(1, TEXT_TOKENS, dtype=torch.long),
    }
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


def distributed(name: str) -> bool:
    """Whether the variant runs on several GPUs (a `ddp` or `fsdp` part)."""
    return bool({"ddp", "fsdp"} & set(name.split("-")))


def apply_variant(model, name: str) -> None:
    """`eager` or `compiled`, then optional parts (see the module docstring), e.g. compiled-ckpt20-budget0.5."""
    mode, *parts = name.split("-")
    if mode not in ("eager", "compiled"):
        raise SystemExit(f"unknown variant {name!r}: starts with eager or compiled")
    budget, aggressive, cuda_graphs = 1.0, True, False
    blocks = len(model.transformer_blocks)
    checkpointed = offloaded = feedforward = 0
    for part in parts:
        if part.startswith("ckpt"):
            checkpointed = int(part[4:]) if part[4:] else blocks
        elif part.startswith("off"):
            offloaded = int(part[3:]) if part[3:] else blocks
        elif part.startswith("ff"):
            feedforward = int(part[2:]) if part[2:] else blocks
        elif part.startswith("budget") and mode == "compiled":
            budget = float(part[6:])
        elif part == "noagg":
            aggressive = False
        elif part == "cg":
            cuda_graphs = True
        elif part == "autotune":  # inductor benchmarks Triton templates against cuBLAS for every product shape
            import torch._inductor.config as inductor_config

            inductor_config.max_autotune_gemm = True
        elif part == "fp8":
            from trainer.fp8 import use_fp8_base_linears

            use_fp8_base_linears(model)
            torch.cuda.empty_cache()
        elif part == "triton":
            from ltx_kernels.install import install_attention

            install_attention(model)
        elif part not in ("pertoken", "mask", "ddp", "fsdp") and not part.startswith("plan"):  # handled later
            raise SystemExit(f"unknown part {part!r} of variant {name!r}")
    checkpoint_blocks(model, checkpointed, offloaded)
    recompute_feedforward(model, feedforward, after=checkpointed)
    if mode == "compiled":
        compile_blocks(model, budget, aggressive_recomputation=aggressive, cuda_graphs=cuda_graphs)


def kernel_profile(step, top: int = 25) -> None:
    """Prints where one step's GPU time goes: kernels grouped into matrix products, attention, generated (Triton)
    elementwise kernels and the rest, then the `top` kernels by total time, the GPU's waits, the host operations
    that took longest and the products by shape."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    groups: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for e in kernels:
        n = e.name.lower()
        group = ("attention" if any(k in n for k in ("flash", "fmha", "cudnn", "attention", "sdpa")) else
                 "matmul" if any(k in n for k in ("gemm", "nvjet", "xmma", "cutlass", "sm90")) else
                 "triton" if n.startswith("triton") else "other")
        groups[group] = groups.get(group, 0.0) + e.device_time_total / 1e3
        entry = by_name.setdefault(e.name[:110], [0.0, 0])
        entry[0] += e.device_time_total / 1e3
        entry[1] += 1
    total = sum(groups.values())
    print(f"PROFILE kernel time {total:.1f} ms in {len(kernels)} kernels: " +
          ", ".join(f"{g} {t:.1f} ms" for g, t in sorted(groups.items(), key=lambda kv: -kv[1])), flush=True)
    for kernel, (ms, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"PROFILE {ms:8.2f} ms {calls:5d}x  {kernel}", flush=True)
    idle_profile(kernels, top)
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"PROFILE host {e.self_cpu_time_total / 1e3:8.2f} ms {e.count:5d}x  {e.key[:100]}", flush=True)
    # Matrix products by operand shapes: the LoRA products (rank 32) apart from the base ones.
    products = [e for e in prof.key_averages(group_by_input_shape=True)
                if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm")]
    for e in sorted(products, key=lambda e: -e.device_time_total)[:top]:
        print(f"PROFILE {e.device_time_total / 1e3:8.2f} ms {e.count:5d}x  {e.key} {e.input_shapes}", flush=True)


def idle_profile(kernels, top: int) -> None:
    """Prints how long the GPU waited between kernels (launches slower than the kernels, or a wait on the host),
    summed by the kernel that came after the wait."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name[:100]) for e in kernels)
    waits: dict[str, list] = {}
    busy_until = spans[0][0]
    for start, end, name in spans:
        if start > busy_until:
            entry = waits.setdefault(name, [0.0, 0])
            entry[0] += (start - busy_until) / 1e3
            entry[1] += 1
        busy_until = max(busy_until, end)
    print(f"PROFILE GPU idle {sum(w[0] for w in waits.values()):.1f} ms of {(busy_until - spans[0][0]) / 1e3:.1f} ms "
          "between the first kernel and the last; by the kernel after the wait:", flush=True)
    for name, (ms, count) in sorted(waits.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"PROFILE idle {ms:8.2f} ms {count:5d}x before {name}", flush=True)


def build_ours(name: str, target, tokens: int, device: torch.device):
    """Our model in variant `name`: (one training step, model FLOPs, attention FLOPs)."""
    model = build_random_transformer(target, seed=0, dtype=torch.bfloat16, device=device)
    inject_lora(model, 32, 32.0, 0.0, LORA_TARGETS)
    params = lora_parameters(model)
    batch = batch_for(target, tokens)
    if "mask" in name.split("-"):  # as the trainer passed it before (every text token is real here)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    else:
        batch = batch_to_device(batch, device)  # as the trainer does: the all-ones mask becomes None
    inputs = build_step_inputs(batch, "text-to-audio-video", torch.Generator().manual_seed(0))
    if "pertoken" in name.split("-"):
        kw = inputs.model_kwargs
        kw["timestep"] = kw["timestep"].expand(kw["hidden_states"].shape[:2])
        kw["audio_timestep"] = kw["audio_timestep"].expand(kw["audio_hidden_states"].shape[:2])
    with sdpa_kernel(ATTENTION_BACKENDS, set_priority=True):
        flops, attention_flops = model_flops(model, inputs)
    apply_variant(model, name)
    parts = name.split("-")
    if "ddp" in parts:  # the LoRA gradients averaged over the processes, as accelerate's MULTI_GPU does
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    elif "fsdp" in parts:  # every block its own unit, as configs/accelerate/fsdp.yaml shards them
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer_blocks:
            fully_shard(block)
        fully_shard(model)
        params = lora_parameters(model)
        torch.cuda.empty_cache()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    plan = next((part for part in parts if part.startswith("plan")), None)
    if plan:
        if distributed(name):
            raise SystemExit(f"{name}: the -plan part is measured on one GPU")
        plan_memory(model, inputs, optimizer, device, float(plan[4:]) if plan[4:] else None)

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = compute_loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, flops, attention_flops


def plan_memory(model, inputs, optimizer, device: torch.device, limit_gib: float | None) -> None:
    """Plans and applies the blocks' split as `train.gradient_checkpointing: auto` does (trainer/train.py), for the
    benchmark's step, and prints the plan (PLAN lines)."""
    def probe() -> None:
        try:
            with sdpa_kernel(ATTENTION_BACKENDS, set_priority=True), torch.autocast("cuda", torch.bfloat16):
                loss, _ = compute_loss(model, inputs)
            with sdpa_kernel(ATTENTION_BACKENDS, set_priority=True):
                loss.backward()
        finally:
            optimizer.zero_grad(set_to_none=True)

    total = torch.cuda.get_device_properties(device).total_memory
    budget = memory_budget(device, limit_gib)
    base, per_block = measure_block_memory(model, probe, device)
    base += optimizer_state_bytes(model)
    plan = plan_blocks(len(model.transformer_blocks), base, per_block, budget,
                       host_available=psutil.virtual_memory().available)
    checkpoint_blocks(model, plan.checkpointed, plan.offloaded)
    print(f"PLAN every block checkpointed {base / 2**30:.2f} GiB, each kept block "
          f"{(per_block or 0) / 2**30:.3f} GiB; budget {budget / 2**30:.1f} of {total / 2**30:.1f} GiB: "
          f"{plan.describe()}", flush=True)


def run_variant(name: str, target_name: str, tokens: int, warmup: int, steps: int, layers: int | None = None,
                profile: bool = False) -> dict:
    device = torch.device("cuda")
    if distributed(name):  # one process per GPU, started by torchrun
        torch.distributed.init_process_group("nccl")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    target = TARGETS[target_name]
    if layers:  # a shorter stack of the same blocks, for profiles
        target = dataclasses.replace(target, transformer_config={**target.transformer_config, "num_layers": layers})
    started = time.perf_counter()
    if name.startswith("ltxcore-"):  # the official implementation (scripts/ltx_core_step.py)
        import ltx_core_step

        if name not in ("ltxcore-eager-ckpt", "ltxcore-compiled-ckpt"):
            raise SystemExit(f"unknown variant {name!r}: ltxcore-eager-ckpt or ltxcore-compiled-ckpt")
        _, _, train_step = ltx_core_step.build(target_name, tokens, "compiled" in name, device, layers)
        flops = attention_flops = None
    else:
        train_step, flops, attention_flops = build_ours(name, target, tokens, device)
    built = time.perf_counter() - started

    def step() -> None:
        # The backward too: a checkpointed block recomputes its forward there, with the same attention backend.
        with sdpa_kernel(ATTENTION_BACKENDS, set_priority=True):
            train_step()

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
    peak, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    if torch.distributed.is_initialized():  # the slowest process and the fullest GPU
        stats = torch.tensor([statistics.median(times), peak, reserved], device=device)
        torch.distributed.all_reduce(stats, torch.distributed.ReduceOp.MAX)
        times = [stats[0].item()]  # the slowest process's median
        peak, reserved = stats[1].item(), stats[2].item()
    if profile:
        kernel_profile(step)
    return {"variant": name, "tokens": tokens, "gpus": torch.distributed.get_world_size()
            if torch.distributed.is_initialized() else 1, "step_s": statistics.median(times), "steps": times,
            "peak_gib": peak, "reserved_gib": reserved, "model_tflop": flops and flops / 1e12,
            "attention_tflop": attention_flops and attention_flops / 1e12,
            "build_s": built, "warmup_s": warm}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="ltx-2.3", choices=["ltx-2.3", "ltx-2"])
    parser.add_argument("--variants", default="eager-ckpt,compiled-ckpt,compiled")
    parser.add_argument("--tokens", default="6144", help="video token counts, e.g. 6144,14720")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, help="build only this many blocks (for --profile)")
    parser.add_argument("--profile", action="store_true", help="after timing, print where one step's GPU time goes")
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count(),
                        help="processes (one per GPU) for the -ddp and -fsdp variants")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    if args.one:
        result = run_variant(args.one, args.target, int(args.tokens), args.warmup, args.steps, args.layers,
                             args.profile)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print("RESULT " + json.dumps(result), flush=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
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
            launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                         f"--nproc_per_node={args.gpus}"] if distributed(name) else [sys.executable])
            command = launcher + [__file__, "--one", name, "--target", args.target, "--tokens", str(tokens),
                                  "--warmup", str(args.warmup), "--steps", str(args.steps)]
            command += (["--layers", str(args.layers)] if args.layers else []) + (["--profile"] if args.profile else [])
            done = subprocess.run(command, capture_output=True, text=True)
            print("\n".join(line for line in done.stdout.splitlines() if line.startswith(("PROFILE", "PLAN"))),
                  flush=True)
            found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if found:
                result = json.loads(found[-1].removeprefix("RESULT "))
                if result["model_tflop"] is None:  # the official model: the same architecture, the same FLOPs
                    result["model_tflop"] = next((r["model_tflop"] for r in rows if r.get("model_tflop")
                                                  and r["tokens"] == tokens), None)
                result["mfu"] = result["model_tflop"] and result["model_tflop"] / result["step_s"] / rate
                # Several GPUs, each with a batch of 1: against the same variant on one GPU, measured in this run.
                single = "-".join(p for p in name.split("-") if p not in ("ddp", "fsdp"))
                alone = next((r for r in rows if r["variant"] == single and r["tokens"] == tokens
                              and "step_s" in r), None)
                if result["gpus"] > 1 and alone:
                    result["scaling"] = alone["step_s"] / result["step_s"]
                rows.append(result)
                print(json.dumps(result), flush=True)
            else:
                reason = "out of memory" if "OutOfMemoryError" in done.stderr else done.stderr.strip()[-1500:]
                rows.append({"variant": name, "tokens": tokens, "error": reason})
                print(f"{name} at {tokens} tokens failed: {reason}", flush=True)

    print("\n| video tokens | variant | GPUs | step s (median) | peak allocated GiB | peak reserved GiB | MFU per GPU "
          "| scaling |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['tokens']} | {r['variant']} | | {r['error'][:40]} | | | | |")
        else:
            mfu = f"{r['mfu']:.0%}" if r["mfu"] else ""
            scaling = f"{r['scaling']:.0%}" if "scaling" in r else ""
            print(f"| {r['tokens']} | {r['variant']} | {r['gpus']} | {r['step_s']:.3f} | {r['peak_gib']:.1f} | "
                  f"{r['reserved_gib']:.1f} | {mfu} | {scaling} |")


if __name__ == "__main__":
    main()
