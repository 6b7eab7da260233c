"""Plain-PyTorch references for ltx_kernels/norm_modulate.py and ltx_kernels/residual.py, the inputs the tests feed both, and
how close a kernel must come. The references run in their inputs' dtype: the tests give them float64 copies."""

from __future__ import annotations

import torch

# Elementwise bound: |kernel - reference| <= RTOL * (|reference| + rms(reference)). The kernels compute in fp32 and
# round once into the output dtype, which costs at most half an ulp (2^-8 relative for bf16, 2^-11 for fp16): RTOL is
# one ulp, twice that. The rms floor covers fp32 rounding inside the row sums, where an element of dx or a summed
# table gradient can cancel to near zero.
RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

TABLES = {
    "token": lambda B, N: (B, N),  # per-token timesteps: [B, N, C]
    "sample": lambda B, N: (B, 1),  # one timestep per sample: [B, 1, C]
    "shared": lambda B, N: (1, 1),  # one row for everything: [1, 1, C]
    "positions": lambda B, N: (1, N),  # per token, shared by the batch: [1, N, C]
}


def rms_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + scale) + shift


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return x + y * gate


def activation(B: int, N: int, C: int, dtype: torch.dtype, device: str, strided: bool = False) -> torch.Tensor:
    """Fresh random [B, N, C] values; `strided` gives a view into wider rows (row stride C + 3)."""
    if strided:
        return torch.randn(B, N, C + 3, dtype=dtype, device=device)[..., 3:]
    return torch.randn(B, N, C, dtype=dtype, device=device)


def table(kind: str, B: int, N: int, C: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A modulation table laid out as the LTX-2 block makes it: one of six strided views of a [b, n, 6, C] tensor."""
    b, n = TABLES[kind](B, N)
    return torch.randn(b, n, 6, C, dtype=dtype, device=device)[:, :, 2]


def reference_grads(fn, inputs: list[torch.Tensor], dout: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference's output and gradients, computed in float64 from the same input values."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out, list(torch.autograd.grad(out, leaves, dout.double()))


def assert_close(got: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """Within RTOL of got's dtype, every element written."""
    dtype = got.dtype
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: {(~torch.isfinite(got)).sum()} elements not finite (left unwritten?)"
    err = (got.double() - ref).abs()
    bound = RTOL[dtype] * (ref.abs() + ref.pow(2).mean().sqrt())
    worst = (err / bound).flatten().argmax()
    assert (err <= bound).all(), (f"{name}: {(err > bound).sum()} of {err.numel()} elements off by more than "
                                  f"rtol {RTOL[dtype]:.2g}; worst {got.flatten()[worst]} vs {ref.flatten()[worst]}")


def poison_empty(monkeypatch) -> None:
    """Makes every torch.empty start as NaN, so an element a kernel fails to write shows in the comparison."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
