"""Benchmark: the fused RMSNorm + AdaLN modulation and gated residual kernels against eager PyTorch and torch.compile.

At the model's shapes (video [1, 6144, 4096] and [1, 14720, 4096], audio [1, 126, 2048]) in bf16, with per-token
tables laid out as the LTX-2 block makes them (strided views of one [B, N, 6, C] tensor), each implementation of
  norm_modulate   RMSNorm(x) * (1 + scale) + shift   (eager: diffusers' RMSNorm, as LTX2VideoTransformerBlock runs it)
  residual        x + y * gate
is timed (median of triton.testing.do_bench, L2 flushed between runs) for
  fwd             the forward alone
  fwd+bwd         forward and backward, every input wanting its gradient
  fwd+bwd LoRA    forward and backward with the tables frozen, as in LoRA training (only x, and y, want gradients)
GB/s divides the bytes the op must move at least by the time, the same count for every implementation: one read or
write per [B, N, C] tensor touched (norm_modulate: fwd reads x, scale, shift and writes y; its backward reads x, scale,
dy and writes dx, dscale, dshift; residual: fwd reads x, y, gate and writes out; its backward reads dout, gate, y and
writes dy, dgate, dx being dout itself). Needs one CUDA GPU; expected to take a minute or two on an H100, mostly
torch.compile.

    python scripts/bench_norm.py
"""

from __future__ import annotations

import diffusers
import torch
import triton
from diffusers.models.normalization import RMSNorm

from ltx_kernels.norm_modulate import rms_norm_modulate
from ltx_kernels.residual import gated_residual

SHAPES = {"video 6144": (1, 6144, 4096), "video 14720": (1, 14720, 4096), "audio 126": (1, 126, 2048)}
MODES = ["fwd", "fwd+bwd", "fwd+bwd LoRA"]
EPS = 1e-6


NORMS = {C: RMSNorm(C, eps=EPS, elementwise_affine=False) for C in (4096, 2048)}


def eager_norm_modulate(x, scale, shift):
    return NORMS[x.shape[-1]](x) * (1 + scale) + shift


def eager_residual(x, y, gate):
    return x + y * gate


OPS = {
    # name: (ours, eager, which inputs want gradients in LoRA training, tensors moved by fwd, by the full bwd, by the
    # LoRA bwd)
    "norm_modulate": (lambda x, s, h: rms_norm_modulate(x, s, h, EPS), eager_norm_modulate, (True, False, False),
                      4, 6, 4),
    "residual": (gated_residual, eager_residual, (True, True, False), 4, 5, 3),
}


def inputs(shape, grads):
    """x (and y) fresh, the two tables as two of six views of one [B, N, 6, C] tensor, as the block slices them."""
    B, N, C = shape
    tables = torch.randn(B, N, 6, C, device="cuda", dtype=torch.bfloat16)
    tensors = [torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16), tables[:, :, 1], tables[:, :, 0]]
    return [t.detach().requires_grad_(g) for t, g in zip(tensors, grads)]


def step(fn, tensors, dout, mode):
    if mode == "fwd":
        return lambda: fn(*tensors)
    wanted = [t for t in tensors if t.requires_grad]
    return lambda: torch.autograd.grad(fn(*tensors), wanted, dout)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_norm needs a CUDA GPU")
    header = (f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
              f"diffusers {diffusers.__version__}; bf16, per-token tables")
    print(header)
    rows = []
    for op, (ours, eager, lora_grads, fwd_tensors, bwd_tensors, lora_bwd_tensors) in OPS.items():
        for shape_name, shape in SHAPES.items():
            element_bytes = torch.Size(shape).numel() * 2
            moved = {"fwd": fwd_tensors, "fwd+bwd": fwd_tensors + bwd_tensors,
                     "fwd+bwd LoRA": fwd_tensors + lora_bwd_tensors}
            dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
            check = inputs(shape, (False,) * 3)
            error = (ours(*check).float() - eager(*check).float()).abs().max().item()
            for impl in ["triton (ours)", "eager", "torch.compile"]:
                torch._dynamo.reset()  # a fresh compile for each shape and mode, no recompile limit in the way
                fn = {"triton (ours)": ours, "eager": eager, "torch.compile": torch.compile(eager)}[impl]
                cells = []
                for mode in MODES:
                    grads = {"fwd": (False,) * 3, "fwd+bwd": (True,) * 3, "fwd+bwd LoRA": lora_grads}[mode]
                    ms = triton.testing.do_bench(step(fn, inputs(shape, grads), dout, mode), return_mode="median")
                    cells += [f"{ms:.3f}", f"{moved[mode] * element_bytes / ms / 1e6:.0f}"]
                print(f"{op} {shape_name} {impl}: {cells} (max |ours - eager| {error:.3g})", flush=True)
                rows.append(f"| {op} | {shape_name} {list(shape)} | {impl} | " + " | ".join(cells) + " |")
    print()
    print(header)
    print()
    print("| op | shape | implementation | fwd ms | GB/s | fwd+bwd ms | GB/s | fwd+bwd LoRA ms | GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
