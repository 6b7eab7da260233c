"""Fused parameter-free RMSNorm + AdaLN modulation, y = rmsnorm(x) * (1 + scale) + shift, forward and backward.

Why: the LTX-2 block runs this before each of its attentions and its feed-forward. Eager PyTorch makes several passes
over the [B, N, C] activations (square-mean in fp32, multiply, cast, multiply, add) and autograd keeps the
intermediates; one Triton pass reads x, scale and shift once and writes y (plus one fp32 rstd per row). The backward
reads x, dy and scale, recomputes the normalised x from the saved rstd, and writes dx, dscale and dshift, each only
when autograd asks for it (in LoRA training the modulation tables are frozen, so only dx).

The modulation tables (scale and shift here, the gate in ltx_kernels/residual.py) are [B or 1, N or 1, C]: per token when
the timesteps are per token, per sample otherwise; in the model they are strided views of one [B, T, 6, C] tensor.
Broadcast dimensions are read with stride 0, never expanded in memory, and a table's gradient is summed over the
dimensions it was broadcast along: per-token rows are written directly, per-sample tables get one fp32 partial sum
per program which the wrapper adds up. Everything is computed in fp32; outputs take the input's dtype.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_C = 8192  # a row is one register tile
TILE = 4096  # elements per program tile: rows of a short C are grouped so each program moves enough bytes

# What a backward kernel does with a table's gradient (a constexpr argument).
SKIP: tl.constexpr = tl.constexpr(0)  # autograd does not want it
PER_TOKEN: tl.constexpr = tl.constexpr(1)  # the table varies over tokens: write each row
PARTIAL: tl.constexpr = tl.constexpr(2)  # the table is shared by the tokens: one partial sum per program


def check_activation(t: torch.Tensor, name: str) -> tuple[int, int, int]:
    """Validates a [B, N, C] activation and returns B, N, C."""
    if t.dim() != 3:
        raise ValueError(f"{name} must be [B, N, C], got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if t.shape[-1] > MAX_C:
        raise ValueError(f"{name} has {t.shape[-1]} channels; at most {MAX_C} are supported")
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name} is on {t.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")
    return tuple(t.shape)


def rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels index B and N by stride and need channels contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_table(t: torch.Tensor, name: str, like: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Validates a modulation table against the activation `like` and returns it with its (B, N) read strides,
    0 along broadcast dimensions."""
    B, N, C = like.shape
    if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] not in (1, N) or t.shape[2] != C:
        raise ValueError(f"{name} must be [{B} or 1, {N} or 1, {C}] to modulate shape {tuple(like.shape)}, "
                         f"got {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, the activations on {like.device}")
    t = rows_contiguous(t)
    return t, t.expand(B, N, C).stride()[:2]


def launch_config(C: int) -> tuple[int, int, int]:
    """BLOCK_C (the row padded to a power of two), ROWS per tile, num_warps."""
    block_c = triton.next_power_of_2(C)
    rows = max(1, min(16, TILE // block_c))
    return block_c, rows, max(1, min(8, rows * block_c // 512))


@functools.lru_cache
def _programs_wanted(device: torch.device) -> int:
    """Programs for a reduction pass: a few per SM on a GPU, few in the interpreter (each one costs CPU time)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def rows_per_program(B: int, N: int, rows: int, partial: bool, device: torch.device) -> int:
    """Tokens each backward program covers: one tile when every gradient is written per row; when a table's gradient
    is a sum over tokens, enough tiles that the partial sums stay few."""
    if not partial:
        return rows
    return rows * triton.cdiv(triton.cdiv(N, rows), max(1, _programs_wanted(device) // B))


def table_grad_buffer(table_shape: torch.Size, want: bool, B: int, N: int, C: int, programs: int,
                      like: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Where a backward kernel writes a table's gradient, and its mode (SKIP, PER_TOKEN or PARTIAL). A table that
    varies over tokens gets its rows; a shared one gets one fp32 partial sum per (sample, program). The buffer is
    fp32 whenever finish_table_grad still has to sum it. Unwanted, it is `like`, a placeholder the kernel ignores."""
    if not want:
        return like, SKIP.value
    per_token = table_shape[1] == N
    summed = not per_token or table_shape[0] != B
    buf = torch.empty((B, N if per_token else programs, C), device=like.device,
                      dtype=torch.float32 if summed else dtype)
    return buf, (PER_TOKEN if per_token else PARTIAL).value


def finish_table_grad(buf: torch.Tensor, mode: int, table_shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
    """The gradient autograd gets for a table: the buffer summed over the dimensions the table was broadcast along."""
    if mode == SKIP.value:
        return None
    dims = [d for d in (0, 1) if table_shape[d] == 1 and buf.shape[d] != 1]
    if dims:
        buf = buf.sum(dims, keepdim=True)
    return buf.to(dtype)


@triton.jit
def _forward_kernel(x_ptr, scale_ptr, shift_ptr, y_ptr, rstd_ptr, N, C, eps,
                    x_sb, x_sn, scale_sb, scale_sn, shift_sb, shift_sn,
                    ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)[None, :]
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < C)
    r = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + b * x_sb + r * x_sn + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * scale_sb + r * scale_sn + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b * shift_sb + r * shift_sn + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)
    y = x * rstd[:, None] * (1.0 + scale) + shift
    tl.store(y_ptr + (b * N + r) * C + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + b * N + rows, rstd, mask=row_ok)


@triton.jit
def _backward_kernel(x_ptr, scale_ptr, rstd_ptr, dy_ptr, dx_ptr, dscale_ptr, dshift_ptr, N, C, rows_per_program,
                     x_sb, x_sn, scale_sb, scale_sn, dy_sb, dy_sn, dscale_sb, dscale_sn, dshift_sb, dshift_sn,
                     WANT_DX: tl.constexpr, DSCALE: tl.constexpr, DSHIFT: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    # y = xhat * (1 + scale) + shift with xhat = x * rstd:
    # dshift = dy, dscale = dy * xhat, dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * (1 + scale).
    program = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)[None, :]
    col_ok = cols < C
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, N)
    dscale_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    dshift_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(first, last, ROWS):
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok
        r = rows.to(tl.int64)[:, None]
        dy = tl.load(dy_ptr + b * dy_sb + r * dy_sn + cols, mask=mask, other=0.0).to(tl.float32)
        if WANT_DX or DSCALE != SKIP:
            x = tl.load(x_ptr + b * x_sb + r * x_sn + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + b * N + rows, mask=row_ok, other=0.0)
            xhat = x * rstd[:, None]
        if WANT_DX:
            scale = tl.load(scale_ptr + b * scale_sb + r * scale_sn + cols, mask=mask, other=0.0).to(tl.float32)
            g = dy * (1.0 + scale)
            dx = (g - xhat * (tl.sum(g * xhat, axis=1) / C)[:, None]) * rstd[:, None]
            tl.store(dx_ptr + (b * N + r) * C + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if DSCALE == PER_TOKEN:
            tl.store(dscale_ptr + b * dscale_sb + r * dscale_sn + cols,
                     (dy * xhat).to(dscale_ptr.dtype.element_ty), mask=mask)
        if DSCALE == PARTIAL:
            dscale_sum += tl.sum(dy * xhat, axis=0)
        if DSHIFT == PER_TOKEN:
            tl.store(dshift_ptr + b * dshift_sb + r * dshift_sn + cols, dy.to(dshift_ptr.dtype.element_ty), mask=mask)
        if DSHIFT == PARTIAL:
            dshift_sum += tl.sum(dy, axis=0)
    if DSCALE == PARTIAL:
        tl.store(dscale_ptr + b * dscale_sb + program * dscale_sn + cols, dscale_sum[None, :], mask=col_ok)
    if DSHIFT == PARTIAL:
        tl.store(dshift_ptr + b * dshift_sb + program * dshift_sn + cols, dshift_sum[None, :], mask=col_ok)


class _RMSNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, shift, eps):
        B, N, C = check_activation(x, "x")
        x = rows_contiguous(x)
        scale, scale_strides = check_table(scale, "scale", x)
        shift, shift_strides = check_table(shift, "shift", x)
        y = torch.empty((B, N, C), device=x.device, dtype=x.dtype)
        rstd = torch.empty((B, N), device=x.device, dtype=torch.float32)
        block_c, rows, warps = launch_config(C)
        _forward_kernel[(triton.cdiv(N, rows), B)](
            x, scale, shift, y, rstd, N, C, eps, *x.stride()[:2], *scale_strides, *shift_strides,
            ROWS=rows, BLOCK_C=block_c, num_warps=warps)
        # Only what the wanted gradients read: x for dx and dscale, scale for dx; never shift.
        want_dx, want_dscale, _, _ = ctx.needs_input_grad
        ctx.save_for_backward(x if want_dx or want_dscale else None, scale if want_dx else None, rstd)
        ctx.x_dtype, ctx.scale_strides = x.dtype, scale_strides
        ctx.table_shapes, ctx.table_dtypes = (scale.shape, shift.shape), (scale.dtype, shift.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, rstd = ctx.saved_tensors
        want_dx, want_dscale, want_dshift, _ = ctx.needs_input_grad
        (scale_shape, shift_shape), (scale_dtype, shift_dtype) = ctx.table_shapes, ctx.table_dtypes
        B, N, C = dy.shape
        dy = rows_contiguous(dy)
        x = dy if x is None else x  # placeholders for what the kernel will not read
        scale = dy if scale is None else scale
        block_c, rows, warps = launch_config(C)
        partial = (want_dscale and scale_shape[1] != N) or (want_dshift and shift_shape[1] != N)
        per_program = rows_per_program(B, N, rows, partial, dy.device)
        programs = triton.cdiv(N, per_program)
        dx = torch.empty((B, N, C), device=dy.device, dtype=ctx.x_dtype) if want_dx else dy
        dscale, dscale_mode = table_grad_buffer(scale_shape, want_dscale, B, N, C, programs, dy, scale_dtype)
        dshift, dshift_mode = table_grad_buffer(shift_shape, want_dshift, B, N, C, programs, dy, shift_dtype)
        _backward_kernel[(programs, B)](
            x, scale, rstd, dy, dx, dscale, dshift, N, C, per_program,
            *x.stride()[:2], *ctx.scale_strides, *dy.stride()[:2], *dscale.stride()[:2], *dshift.stride()[:2],
            WANT_DX=want_dx, DSCALE=dscale_mode, DSHIFT=dshift_mode, ROWS=rows, BLOCK_C=block_c, num_warps=warps)
        return (dx if want_dx else None,
                finish_table_grad(dscale, dscale_mode, scale_shape, scale_dtype),
                finish_table_grad(dshift, dshift_mode, shift_shape, shift_dtype),
                None)


def rms_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * (1 + scale) + shift, in fp32, returned in x's dtype.

    x is [B, N, C]; scale and shift are [B or 1, N or 1, C] (per-token or per-sample AdaLN tables, any dtype of
    float32/float16/bfloat16, strided views welcome). Differentiable in all three.
    """
    return _RMSNormModulate.apply(x, scale, shift, float(eps))
