"""Fused gated residual add, out = x + y * gate, forward and backward.

Why: the LTX-2 block closes each attention and its feed-forward with `x + out * gate`, where gate is an AdaLN table
(per token or per sample, see ltx_kernels/norm_modulate.py for the layout and the broadcasting rules shared here). Eager
PyTorch writes y * gate to memory before adding it and rounds twice; here one pass reads x, y and gate and writes
out, rounding once. The backward passes dout through as dx untouched and, in one pass over dout, y and gate, writes
dy = dout * gate and dgate = dout * y (summed over broadcast dimensions), each only when autograd asks for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ltx_kernels.norm_modulate import (PARTIAL, PER_TOKEN, check_activation, check_table, finish_table_grad,
                                   launch_config, rows_contiguous, rows_per_program, table_grad_buffer)


@triton.jit
def _forward_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, N, C, x_sb, x_sn, y_sb, y_sn, gate_sb, gate_sn,
                    ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < N)[:, None] & (cols < C)
    r = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + b * x_sb + r * x_sn + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * y_sb + r * y_sn + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * gate_sb + r * gate_sn + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (b * N + r) * C + cols, (x + y * gate).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(dout_ptr, y_ptr, gate_ptr, dy_ptr, dgate_ptr, N, C, rows_per_program,
                     dout_sb, dout_sn, y_sb, y_sn, gate_sb, gate_sn, dgate_sb, dgate_sn,
                     WANT_DY: tl.constexpr, DGATE: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    program = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)[None, :]
    col_ok = cols < C
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    dgate_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(first, last, ROWS):
        rows = start + tl.arange(0, ROWS)
        mask = (rows < last)[:, None] & col_ok
        r = rows.to(tl.int64)[:, None]
        dout = tl.load(dout_ptr + b * dout_sb + r * dout_sn + cols, mask=mask, other=0.0).to(tl.float32)
        if WANT_DY:
            gate = tl.load(gate_ptr + b * gate_sb + r * gate_sn + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dy_ptr + (b * N + r) * C + cols, (dout * gate).to(dy_ptr.dtype.element_ty), mask=mask)
        if DGATE == PER_TOKEN:
            y = tl.load(y_ptr + b * y_sb + r * y_sn + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dgate_ptr + b * dgate_sb + r * dgate_sn + cols, (dout * y).to(dgate_ptr.dtype.element_ty),
                     mask=mask)
        if DGATE == PARTIAL:
            y = tl.load(y_ptr + b * y_sb + r * y_sn + cols, mask=mask, other=0.0).to(tl.float32)
            dgate_sum += tl.sum(dout * y, axis=0)
    if DGATE == PARTIAL:
        tl.store(dgate_ptr + b * dgate_sb + program * dgate_sn + cols, dgate_sum[None, :], mask=col_ok)


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate):
        B, N, C = check_activation(x, "x")
        check_activation(y, "y")
        if y.shape != x.shape or y.device != x.device:
            raise ValueError(f"y must have x's shape {tuple(x.shape)} on {x.device}, "
                             f"got {tuple(y.shape)} on {y.device}")
        x, y = rows_contiguous(x), rows_contiguous(y)
        gate, gate_strides = check_table(gate, "gate", x)
        out = torch.empty((B, N, C), device=x.device, dtype=x.dtype)
        block_c, rows, warps = launch_config(C)
        _forward_kernel[(triton.cdiv(N, rows), B)](
            x, y, gate, out, N, C, *x.stride()[:2], *y.stride()[:2], *gate_strides,
            ROWS=rows, BLOCK_C=block_c, num_warps=warps)
        # Only what the wanted gradients read: with a frozen gate (LoRA training) y is not kept alive.
        _, want_dy, want_dgate = ctx.needs_input_grad
        ctx.save_for_backward(y if want_dgate else None, gate if want_dy else None)
        ctx.y_dtype, ctx.gate_shape, ctx.gate_dtype, ctx.gate_strides = y.dtype, gate.shape, gate.dtype, gate_strides
        return out

    @staticmethod
    def backward(ctx, dout):
        y, gate = ctx.saved_tensors
        want_dx, want_dy, want_dgate = ctx.needs_input_grad
        if not (want_dy or want_dgate):
            return dout if want_dx else None, None, None
        B, N, C = dout.shape
        dout = rows_contiguous(dout)
        y = dout if y is None else y  # placeholders for what the kernel will not read
        gate = dout if gate is None else gate
        block_c, rows, warps = launch_config(C)
        per_program = rows_per_program(B, N, rows, want_dgate and ctx.gate_shape[1] != N, dout.device)
        programs = triton.cdiv(N, per_program)
        dy = torch.empty((B, N, C), device=dout.device, dtype=ctx.y_dtype) if want_dy else dout
        dgate, dgate_mode = table_grad_buffer(ctx.gate_shape, want_dgate, B, N, C, programs, dout, ctx.gate_dtype)
        _backward_kernel[(programs, B)](
            dout, y, gate, dy, dgate, N, C, per_program,
            *dout.stride()[:2], *y.stride()[:2], *ctx.gate_strides, *dgate.stride()[:2],
            WANT_DY=want_dy, DGATE=dgate_mode, ROWS=rows, BLOCK_C=block_c, num_warps=warps)
        return (dout if want_dx else None, dy if want_dy else None,
                finish_table_grad(dgate, dgate_mode, ctx.gate_shape, ctx.gate_dtype))


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate, in fp32, returned in x's dtype.

    x and y are [B, N, C]; gate is [B or 1, N or 1, C] (a per-token or per-sample AdaLN table). Differentiable in all
    three.
    """
    return _GatedResidual.apply(x, y, gate)
