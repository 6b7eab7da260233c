"""fp8 matrix products for the frozen base Linears of the transformer blocks (`train.fp8`).

LoRA trains adapters beside frozen weights, so the base Linears never need a weight gradient: their forward and
their input gradient are the two products left, and both run on the fp8 tensor cores of H100/H200 (and Ada) GPUs.
Each frozen weight is stored once in float8 e4m3: half the bytes of bf16. Each input, and each incoming gradient,
is quantized on the fly. Every tensor has one scale (its largest magnitude maps to fp8's largest value): the product
applies scalar scales for free, the gradient needs no per-channel multiply first, and per-row scales were no faster
(slower for the feed-forward's down-projection gradient: docs/benchmarks.md, fifth round). The products run at 1.6x
bf16 on an H200, but the quantizing passes and the weight transposes take back much of it: the step is not reliably
faster, and fp8 is for memory (half the weight bytes). e4m3 is a floating-point format, so a small row beside an outlier keeps its relative
precision as long as it is within about 2^15 of the largest value. The weight's transposed copy for the input
gradient is made in the backward and not kept. The LoRA adapters beside them are untouched: they see the
unquantized input and train in full precision.

Error (tests/test_fp8.py): a product's output and input gradient stay within 5% (norm-wise relative error) of the
exact product at random inputs, typically 3-4%; the tiny model learns a planted LoRA as well as without fp8.
"""

from __future__ import annotations

import torch

from trainer.config import ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (fp8 values, fp32 scale, a scalar) with x ~= values * scale, the tensor scaled to fp8's full range."""
    scale = x.abs().amax().float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


class _Fp8Product(torch.autograd.Function):
    """y = x @ (weight * weight_scale)^T in fp8, and dx = dy @ (weight * weight_scale), bf16 out."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, weight_scale)
        ctx.input_dtype = x.dtype
        values, scale = _quantize(x)
        # The second operand must be column-major: weight [N, K] row-major, transposed, is.
        return torch._scaled_mm(values, weight.t(), scale_a=scale, scale_b=weight_scale, out_dtype=torch.bfloat16)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, weight_scale = ctx.saved_tensors
        values, scale = _quantize(grad)
        column_major = weight.t().contiguous().t()  # [N, K] with strides (1, N): a transient copy, not kept
        dx = torch._scaled_mm(values, column_major, scale_a=scale, scale_b=weight_scale, out_dtype=torch.bfloat16)
        return dx.to(ctx.input_dtype), None, None


class Fp8Linear(torch.nn.Module):
    """A frozen Linear whose weight is kept in fp8 (e4m3, one scale for the tensor); output in bf16."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = _quantize(linear.weight.detach())
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Fp8Product.apply(x.reshape(-1, self.in_features), self.weight, self.weight_scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3"


def use_fp8_base_linears(model: torch.nn.Module) -> int:
    """Replaces every frozen Linear inside the transformer blocks (LoRA base layers included; the adapters, which
    train, are left alone) whose sizes the fp8 tensor cores take (multiples of 16) by an Fp8Linear. Returns how
    many. Call after the LoRA adapters are injected; the bf16 weights are freed."""
    replaced = 0
    for block in model.transformer_blocks:
        for name, module in list(block.named_modules()):
            if (type(module) is torch.nn.Linear and not module.weight.requires_grad
                    and module.in_features % 16 == 0 and module.out_features % 16 == 0):
                parent_name, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent_name) if parent_name else block, child, Fp8Linear(module))
                replaced += 1
    return replaced


def check_fp8_device(device: torch.device) -> None:
    """fp8 tensor cores exist from compute capability 8.9 (Ada, Hopper); the CPU runs the same arithmetic, slowly."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"train.fp8: {name} has no fp8 tensor cores (compute capability 8.9 or newer: H100, H200, "
                         f"L40S, RTX 4090); set train.fp8: false")
