"""Benchmark: the fused attention sublayer against the best composition PyTorch offers, at the LTX-2.3 shapes.

For each attention of the block (batch 1, bf16, heads x head dim and token counts of the production model)
  sublayer   (a) ours: q/k RMSNorm across heads (learnable weight) in torch.compile, then ltx_kernels.attention with the
                 split RoPE, the key bias (text: the model's padding mask, all keys kept) and the per-head gate
             (b) the same sublayer composed as diffusers runs it - RMSNorm, apply_split_rotary_emb, SDPA with the
                 cuDNN backend, gate - under torch.compile
  core       our kernel without RoPE, bias or gate against cuDNN SDPA alone
is timed for the forward and for forward+backward (median of triton.testing.do_bench, L2 flushed between runs; the
20th-80th percentiles go to the log). TFLOP/s counts 4*B*H*Nq*Nk*D for the forward and 2.5 times that for the
backward, for every implementation. The last output is a markdown table for docs/benchmarks.md.

    python scripts/bench_attention.py              # all shapes, a few minutes on an H100 (compiles and autotuning)
    python scripts/bench_attention.py --check      # first: bf16 kernel vs float32 reference at full size
    python scripts/bench_attention.py --only v2a --disasm   # one kind; registers, spills and wgmma per kernel
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
import triton
from diffusers.models.transformers.transformer_ltx2 import apply_split_rotary_emb
from torch.nn.attention import SDPBackend, sdpa_kernel

from ltx_kernels import attention as fused
from ltx_kernels.attention import fused_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
from attention_reference import reference_attention  # noqa: E402

# name: (heads, head dim, Nq, Nk, rope: "self" (one table) / "cross" (query and key tables) / None, key bias)
SHAPES = {
    "video self 6144": (32, 128, 6144, 6144, "self", False),
    "video self 14720": (32, 128, 14720, 14720, "self", False),
    "audio self 126": (32, 64, 126, 126, "self", False),
    "text cross 6144x1024": (32, 128, 6144, 1024, None, True),
    "text cross 14720x1024": (32, 128, 14720, 1024, None, True),
    "audio text cross 126x1024": (32, 64, 126, 1024, None, True),
    "a2v cross 6144x126": (32, 64, 6144, 126, "cross", False),
    "v2a cross 126x6144": (32, 64, 126, 6144, "cross", False),
}
EPS = 1e-6
DTYPE = torch.bfloat16


def _rope(heads, length, half, device):
    """(cos, sin) in fp32 as diffusers' split RoPE lays them out: [B, H, N, D/2] views of a [B, N, H*D/2] table."""
    angles = torch.rand(1, length, heads * half, device=device) * 2 * math.pi
    angles = angles.reshape(1, length, heads, half).transpose(1, 2)
    return angles.cos(), angles.sin()


def make_inputs(shape, device="cuda"):
    heads, d, nq, nk, rope, bias = shape
    width = heads * d
    torch.manual_seed(0)
    x = {
        "q": torch.randn(1, nq, width, device=device, dtype=DTYPE),
        "k": torch.randn(1, nk, width, device=device, dtype=DTYPE),
        "v": torch.randn(1, nk, width, device=device, dtype=DTYPE),
        "g": torch.randn(1, nq, heads, device=device, dtype=DTYPE),
    }
    for t in x.values():
        t.requires_grad_()
    consts = {
        "wq": 1 + 0.1 * torch.randn(width, device=device, dtype=DTYPE),
        "wk": 1 + 0.1 * torch.randn(width, device=device, dtype=DTYPE),
        "q_rope": _rope(heads, nq, d // 2, device) if rope else None,
        "k_rope": None,
        # the model's text mask as the processor receives it: an additive [B, 1, Nk] bias, every key kept
        "bias": torch.zeros(1, 1, nk, device=device, dtype=DTYPE) if bias else None,
        "heads": heads,
    }
    if rope:
        consts["k_rope"] = consts["q_rope"] if rope == "self" else _rope(heads, nk, d // 2, device)
    return x, consts, torch.randn(1, nq, width, device=device, dtype=DTYPE)


def fused_sublayer(q, k, v, g, wq, wk, q_rope, k_rope, bias, heads):
    q = F.rms_norm(q, (q.shape[-1],), wq, EPS)
    k = F.rms_norm(k, (k.shape[-1],), wk, EPS)
    key_bias = bias[:, 0] if bias is not None else None
    return fused_attention(q, k, v, q_rope=q_rope, k_rope=k_rope, gate_logits=g, key_bias=key_bias, heads=heads)


def composed_sublayer(q, k, v, g, wq, wk, q_rope, k_rope, bias, heads, backend=SDPBackend.CUDNN_ATTENTION):
    q = F.rms_norm(q, (q.shape[-1],), wq, EPS)
    k = F.rms_norm(k, (k.shape[-1],), wk, EPS)
    if q_rope is not None:
        q = apply_split_rotary_emb(q, q_rope)
        k = apply_split_rotary_emb(k, k_rope)
    qh, kh, vh = (t.unflatten(2, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias[:, None] if bias is not None else None)
    out = out.transpose(1, 2) * (2 * torch.sigmoid(g)).unsqueeze(-1)
    return out.flatten(2)


def composed_cudnn_or_default(q, k, v, g, wq, wk, q_rope, k_rope, bias, heads):
    """The composition with PyTorch's own choice of SDPA backend (for a mask cuDNN does not take)."""
    return composed_sublayer(q, k, v, g, wq, wk, q_rope, k_rope, bias, heads,
                             backend=[SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                      SDPBackend.EFFICIENT_ATTENTION])


def core_ours(q, k, v, g, wq, wk, q_rope, k_rope, bias, heads):
    return fused_attention(q, k, v, heads=heads)


def core_cudnn(q, k, v, g, wq, wk, q_rope, k_rope, bias, heads):
    qh, kh, vh = (t.unflatten(2, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).flatten(2)


def time_ms(fn):
    """(median, 20th, 80th percentile) in ms."""
    return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))


def measure(fn, x, consts, grad):
    """Forward and forward+backward timings of fn(q, k, v, g, **consts), gradients for q, k, v and g (the ones
    that flow in LoRA training, where the norm weights are frozen)."""
    args = (x["q"], x["k"], x["v"], x["g"])
    used = [t for t in args if t.requires_grad]
    fwd = time_ms(lambda: fn(*args, **consts))
    fwd_bwd = time_ms(lambda: torch.autograd.grad(fn(*args, **consts), used, grad, allow_unused=True))
    return fwd, fwd_bwd


def tflops(shape, ms, backward):
    heads, d, nq, nk, _, _ = shape
    flop = 4 * heads * nq * nk * d * (3.5 if backward else 1.0)
    return flop / (ms * 1e-3) / 1e12


def check(name, shape):
    """The whole sublayer in bf16, ours and the cuDNN composition, against a float32 reference (norms on full rows,
    attention a few heads at a time to bound memory), forward and the gradients of q, k, v and the gate logits."""
    x, consts, grad = make_inputs(shape)
    heads, d, nq, nk, _, _ = shape
    args = [x[n] for n in "qkvg"]
    q32, k32, v32, g32 = (t.detach().float().requires_grad_() for t in args)
    qn = F.rms_norm(q32, (q32.shape[-1],), consts["wq"].float(), EPS)
    kn = F.rms_norm(k32, (k32.shape[-1],), consts["wk"].float(), EPS)
    qn_leaf, kn_leaf = qn.detach().requires_grad_(), kn.detach().requires_grad_()
    bias = consts["bias"][:, 0].float() if consts["bias"] is not None else None
    outs = []
    step = max(1, int(2e9 // (nq * nk * 4)))
    for lo in range(0, heads, step):
        hi = min(heads, lo + step)
        cols = slice(lo * d, hi * d)
        rope = lambda r: tuple(t[:, lo:hi] for t in r) if r is not None else None  # noqa: E731
        out = reference_attention(qn_leaf[..., cols], kn_leaf[..., cols], v32[..., cols], q_rope=rope(consts["q_rope"]),
                                  k_rope=rope(consts["k_rope"]), gate_logits=g32[..., lo:hi], key_bias=bias,
                                  heads=hi - lo)
        out.backward(grad[..., cols].float())
        outs.append(out.detach())
    ref = [torch.cat(outs, dim=-1), torch.autograd.grad(qn, q32, qn_leaf.grad)[0],
           torch.autograd.grad(kn, k32, kn_leaf.grad)[0], v32.grad, g32.grad]
    errors = {}
    for label, fn in (("ours", fused_sublayer), ("composition", composed_cudnn_or_default)):
        out = fn(*args, **consts)
        got = [out, *torch.autograd.grad(out, args, grad)]
        errors[label] = {n: ((a.float() - r).norm() / r.norm()).item()
                         for n, a, r in zip(("out", "dq", "dk", "dv", "dgate"), got, ref)}
    ok = all(e < 2e-2 for e in errors["ours"].values())
    print(f"check {name} (bf16 vs float32 reference, norm-wise relative error; bound 2e-2): "
          + " | ".join(f"{label} " + " ".join(f"{n} {e:.1e}" for n, e in errs.items())
                       for label, errs in errors.items()) + ("  ok" if ok else "  FAIL"), flush=True)
    return ok


def kernel_report():
    """What the compiled kernels look like: the autotuner's choices, then per compiled variant its registers,
    spills, shared memory and wgmma instructions (Hopper's asynchronous tensor-core MMA) in the PTX."""
    for name, tuned in (("forward", fused._fwd_tuned), ("dK/dV", fused._dkdv_tuned), ("dQ", fused._dq_tuned)):
        for key, config in tuned.cache.items():
            print(f"autotune {name}: key {key} -> {config}")
    for name, jit in (("forward", fused._attn_fwd), ("dK/dV", fused._attn_bwd_dkdv), ("dQ", fused._attn_bwd_dq),
                      ("combine", fused._attn_fwd_combine), ("preprocess", fused._attn_bwd_preprocess)):
        for cache in jit.device_caches.values():
            for kernel in cache[0].values():
                try:
                    meta = kernel.metadata
                    constants = getattr(getattr(kernel, "src", None), "constants", {})
                    names = {jit.arg_names[k[0]] if isinstance(k, tuple) else k: v for k, v in constants.items()}
                    blocks = {k: v for k, v in names.items()
                              if k in ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "Q_ROPE", "K_ROPE", "GATE", "BIAS")}
                    print(f"kernel {name}: warps {meta.num_warps} stages {meta.num_stages} shared {meta.shared} "
                          f"regs {kernel.n_regs} spills {kernel.n_spills} "
                          f"wgmma {kernel.asm['ptx'].count('wgmma.mma_async')} {blocks or ''}")
                except Exception as error:  # a config that did not fit (the autotuner skipped it)
                    print(f"kernel {name}: not loadable ({type(error).__name__})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="bf16 correctness vs float32 reference first")
    parser.add_argument("--only", default="", help="run the shapes whose name contains this text")
    parser.add_argument("--disasm", action="store_true", help="print registers, spills and wgmma per kernel")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
          f"cuDNN {torch.backends.cudnn.version()} | triton {triton.__version__} | diffusers {diffusers.__version__}",
          flush=True)
    shapes = {n: s for n, s in SHAPES.items() if args.only in n}
    start = time.time()
    if args.check:
        if not all([check(name, shape) for name, shape in shapes.items()]):
            sys.exit("correctness check failed")

    # one static compile per shape, as the training step (fixed bucket) gets
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    ours = torch.compile(fused_sublayer)
    composed = torch.compile(composed_sublayer)
    composed_any = torch.compile(composed_cudnn_or_default)
    rows = []
    for name, shape in shapes.items():
        x, consts, grad = make_inputs(shape)
        backend = "cuDNN"
        try:
            comp = measure(composed, x, consts, grad)
        except RuntimeError as error:  # cuDNN refused this mask: the composition takes what PyTorch picks
            print(f"{name}: cuDNN SDPA unavailable ({str(error).splitlines()[0][:120]}); composition uses "
                  f"PyTorch's SDPA choice", flush=True)
            backend = "SDPA auto"
            comp = measure(composed_any, x, consts, grad)
        mine = measure(ours, x, consts, grad)
        core = measure(core_ours, x, consts, grad)
        try:
            cudnn = measure(core_cudnn, x, consts, grad)
        except RuntimeError as error:
            print(f"{name}: cuDNN SDPA failed ({str(error).splitlines()[0][:120]})", flush=True)
            cudnn = ((math.nan,) * 3, (math.nan,) * 3)
        results = {"ours": mine, "composed": comp, "core": core, "cudnn": cudnn}
        for label, (fwd, fb) in results.items():
            print(f"{name} {label}: fwd {fwd[0]:.3f} ms [{fwd[1]:.3f}-{fwd[2]:.3f}] {tflops(shape, fwd[0], False):.0f} "
                  f"TFLOP/s | fwd+bwd {fb[0]:.3f} ms [{fb[1]:.3f}-{fb[2]:.3f}] {tflops(shape, fb[0], True):.0f} "
                  f"TFLOP/s", flush=True)
        rows.append((name, shape, backend, results))
    if args.disasm:
        kernel_report()
    print(f"\n{torch.cuda.get_device_name()}, bf16, batch 1; ms (TFLOP/s); speedup = composition / fused sublayer "
          f"(goal >= 1.15x); core / cuDNN = our core's rate over cuDNN's (goal >= 90%); took "
          f"{time.time() - start:.0f} s\n")
    print("| attention | H x D | Nq x Nk | pass | fused sublayer | compiled composition | speedup | our core | "
          "cuDNN core | core / cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, shape, backend, r in rows:
        heads, d, nq, nk, _, _ = shape
        for i, label in enumerate(("fwd", "fwd+bwd")):
            cells = {k: r[k][i][0] for k in r}
            fmt = lambda k: f"{cells[k]:.3f} ({tflops(shape, cells[k], i == 1):.0f})"  # noqa: E731
            comp = fmt("composed") + ("" if backend == "cuDNN" else f" [{backend}]")
            print(f"| {name} | {heads}x{d} | {nq}x{nk} | {label} | {fmt('ours')} | {comp} | "
                  f"{cells['composed'] / cells['ours']:.2f}x | {fmt('core')} | {fmt('cudnn')} | "
                  f"{cells['cudnn'] / cells['core']:.0%} |")


if __name__ == "__main__":
    main()
