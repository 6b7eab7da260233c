"""Fused attention for every attention of the LTX-2 block, in Triton, forward and backward.

One kernel serves video and audio self-attention, the text cross-attention and the audio/video cross-attentions:
the split (rotate-half) RoPE of diffusers' `apply_split_rotary_emb` is applied to Q and K tiles as they are loaded
(no rotated copy of Q or K is ever written), an additive key bias masks padded text keys, and the LTX-2.3 per-head
output gate 2*sigmoid(g) is applied in the epilogue. Softmax is an exp2-based online softmax with fp32
accumulation. The backward is FA2-style: a preprocess computes delta = rowsum(dO * O) (and the gate's gradient),
then one kernel holds a key block and sweeps the queries for dK and dV, another holds a query block and sweeps the
keys for dQ; dQ and dK are rotated back (inverse RoPE) in their epilogues, so gradients are those of the unrotated
projections. When the held sequence is short (126 audio tokens against 6144 video tokens) the swept one is cut into
splits run in parallel, and a small kernel merges their partial results.

Q and K are handled as two halves of each head (the two halves RoPE mixes), so a score is two chained `tl.dot`s
of depth D/2 and the rotation needs no gather. Heads are addressed by stride inside [B, N, H*D] projections: the
wrapper neither transposes nor copies Q, K or V.

The query/key RMSNorms stay outside (PyTorch modules, compiled with the block). They normalise across all heads,
so a per-head tile cannot compute its row's scale: fusing them needs a statistics pass over Q and K first, and
their backward a cross-head reduction after dQ and dK are complete, so it would save only one write and read of
the normalised Q and K in the forward (about 35 us of the ~1 ms video self-attention at 6144 tokens on an H100).

The kernels are wrapped as two `torch.library` custom ops with a registered autograd formula (what a
`torch.autograd.Function` would do), so `torch.compile(fullgraph=True)` of a transformer block keeps them as
opaque ops instead of tracing into Triton.
"""
import contextlib
import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------------
# Tile helpers. The MASK_* flags are compile-time: the hot loops at the standard shapes carry no masks at all.


@triton.jit
def _load2d(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store2d(ptrs, x, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    if MASK_ROWS:
        if MASK_COLS:
            tl.store(ptrs, x, mask=row_ok[:, None] & col_ok[None, :])
        else:
            tl.store(ptrs, x, mask=row_ok[:, None])
    else:
        if MASK_COLS:
            tl.store(ptrs, x, mask=col_ok[None, :])
        else:
            tl.store(ptrs, x)


@triton.jit
def _load1d(ptrs, ok, other, MASK: tl.constexpr):
    if MASK:
        x = tl.load(ptrs, mask=ok, other=other)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _rotate(x1, x2, Cos, Sin, offs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr,
            INVERSE: tl.constexpr):
    """Split RoPE of one tile's two halves, in fp32: (x1 c - x2 s, x2 c + x1 s); INVERSE rotates by -angle, which
    is also the chain rule's map from the rotated tensor's gradient back to the unrotated one."""
    c = _load2d(Cos + offs, row_ok, col_ok, MASK_ROWS, MASK_COLS).to(tl.float32)
    s = _load2d(Sin + offs, row_ok, col_ok, MASK_ROWS, MASK_COLS).to(tl.float32)
    if INVERSE:
        s = -s
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _load_head(X, Cos, Sin, x_off, rope_off, rows, row_ok, cols, col_ok, stride_row, stride_rope_row,
               stride_rope_col, HALF: tl.constexpr, ROPE: tl.constexpr, MASK_ROWS: tl.constexpr,
               MASK_COLS: tl.constexpr):
    """The two halves of one head's rows of Q or K, rotated when ROPE, in the input dtype (as diffusers rounds the
    rotated projection back to it before attention)."""
    ptrs = X + x_off + rows[:, None] * stride_row + cols[None, :]
    x1 = _load2d(ptrs, row_ok, col_ok, MASK_ROWS, MASK_COLS)
    x2 = _load2d(ptrs + HALF, row_ok, col_ok, MASK_ROWS, MASK_COLS)
    if ROPE:
        offs = rope_off + rows[:, None] * stride_rope_row + cols[None, :] * stride_rope_col
        r1, r2 = _rotate(x1, x2, Cos, Sin, offs, row_ok, col_ok, MASK_ROWS, MASK_COLS, False)
        x1 = r1.to(X.dtype.element_ty)
        x2 = r2.to(X.dtype.element_ty)
    return x1, x2


@triton.jit
def _gated_grad(DOut, Gate, do_off, gate_off, rows, row_ok, cols_d, d_ok, stride_do_row, stride_gate_row,
                DTYPE: tl.constexpr, GATE: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr):
    """Gradient of the ungated attention output: dOut * 2*sigmoid(g) per row, in the input dtype for the dots."""
    do = _load2d(DOut + do_off + rows[:, None] * stride_do_row + cols_d[None, :], row_ok, d_ok, MASK_ROWS, MASK_D)
    if GATE:
        g = _load1d(Gate + gate_off + rows * stride_gate_row, row_ok, 0.0, MASK_ROWS).to(tl.float32)
        do = do.to(tl.float32) * (2.0 * tl.sigmoid(g))[:, None]
    return do.to(DTYPE)


# ----------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, QCos, QSin, KCos, KSin, Gate, Bias,
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn, stride_ob, stride_on,
    stride_qrb, stride_qrh, stride_qrn, stride_qrd, stride_krb, stride_krh, stride_krn, stride_krd,
    stride_gb, stride_gn, stride_gh, stride_bb, stride_bn, stride_os, stride_ls,
    H, Nq, Nk, split_len, qk_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    PAD_HALF: tl.constexpr, PAD_D: tl.constexpr,
    Q_ROPE: tl.constexpr, K_ROPE: tl.constexpr, GATE: tl.constexpr, BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of queries against the keys of split program_id(2): out (gated) and the log2-sum-exp, or with
    several splits the split's normalised, ungated partial output and log2-sum-exp (for _attn_fwd_combine)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    dtype = Q.dtype.element_ty

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    cols = tl.arange(0, BLOCK_HALF)
    half_ok = cols < HALF
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < HEAD_DIM

    q1, q2 = _load_head(Q, QCos, QSin, b * stride_qb + h * HEAD_DIM, b * stride_qrb + h * stride_qrh, rows, row_ok,
                        cols, half_ok, stride_qn, stride_qrn, stride_qrd, HALF, Q_ROPE, MASK_M, PAD_HALF)

    k_off = b * stride_kb + h * HEAD_DIM
    kr_off = b * stride_krb + h * stride_krh
    v_ptr = V + b * stride_vb + h * HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = pid_s * split_len
    for start_n in range(start, tl.minimum(start + split_len, Nk), BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < Nk
        k1, k2 = _load_head(K, KCos, KSin, k_off, kr_off, keys, key_ok, cols, half_ok, stride_kn, stride_krn,
                            stride_krd, HALF, K_ROPE, MASK_N, PAD_HALF)
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PRECISION)
        s = s * qk_scale
        if BIAS:
            kb = _load1d(Bias + b * stride_bb + keys * stride_bn, key_ok, 0.0, MASK_N).to(tl.float32)
            s = s + (kb * _LOG2E)[None, :]
        if MASK_N:
            s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load2d(v_ptr + keys[:, None] * stride_vn + cols_d[None, :], key_ok, d_ok, MASK_N, PAD_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    if GATE:
        g = _load1d(Gate + b * stride_gb + h * stride_gh + rows * stride_gn, row_ok, 0.0, MASK_M).to(tl.float32)
        acc = acc * (2.0 * tl.sigmoid(g))[:, None]
    split = pid_s.to(tl.int64)
    o_ptrs = Out + split * stride_os + b * stride_ob + h * HEAD_DIM + rows[:, None] * stride_on + cols_d[None, :]
    _store2d(o_ptrs, acc.to(Out.dtype.element_ty), row_ok, d_ok, MASK_M, PAD_D)
    lse_ptrs = Lse + split * stride_ls + pid_bh.to(tl.int64) * Nq + rows
    if MASK_M:
        tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=row_ok)
    else:
        tl.store(lse_ptrs, m_i + tl.log2(l_i))


@triton.jit
def _attn_fwd_combine(
    Part, PartLse, Out, Lse, Gate,
    stride_ps, stride_pb, stride_pn, stride_ls, stride_ob, stride_on, stride_gb, stride_gn, stride_gh,
    H, Nq, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GATE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merges the splits' partial outputs o_s with their log2-sum-exps l_s: lse = log2(sum 2^l_s) and
    out = sum o_s 2^(l_s - lse), then applies the gate."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    cols_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols_d < HEAD_DIM)[None, :]
    lse_ptrs = PartLse + pid_bh.to(tl.int64) * Nq + rows
    p_ptrs = Part + b * stride_pb + h * HEAD_DIM + rows[:, None] * stride_pn + cols_d[None, :]
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for _ in range(0, n_splits):  # online merge, as the forward merges key blocks
        lse_s = tl.load(lse_ptrs, mask=row_ok, other=0.0)
        m_new = tl.maximum(m, lse_s)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse_s - m_new)
        total = total * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * tl.load(p_ptrs, mask=mask, other=0.0)
        m = m_new
        lse_ptrs += stride_ls
        p_ptrs += stride_ps
    acc = acc / total[:, None]
    if GATE:
        g = tl.load(Gate + b * stride_gb + h * stride_gh + rows * stride_gn, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * (2.0 * tl.sigmoid(g))[:, None]
    o_ptrs = Out + b * stride_ob + h * HEAD_DIM + rows[:, None] * stride_on + cols_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask)
    tl.store(Lse + pid_bh.to(tl.int64) * Nq + rows, m + tl.log2(total), mask=row_ok)


@triton.jit
def _sum_splits(Part, Out, n_elements, n_splits, BLOCK: tl.constexpr):
    """Out = sum over splits of the fp32 partial gradients [splits, *Out.shape], in Out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_elements
    ptrs = Part + offs
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(0, n_splits):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += n_elements
    tl.store(Out + offs, acc.to(Out.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attn_bwd_preprocess(
    Out, DOut, Delta, Gate, DGate,
    stride_ob, stride_on, stride_dob, stride_don, stride_gb, stride_gn, stride_gh,
    H, Nq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GATE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO_attn * O_attn), which equals rowsum(dOut * Out) because the gate cancels; the gate's
    gradient is rowsum(dOut * O_attn) * 2 s (1 - s) = delta * (1 - s) with s = sigmoid(g)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    cols_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols_d < HEAD_DIM)[None, :]
    o = tl.load(Out + b * stride_ob + h * HEAD_DIM + rows[:, None] * stride_on + cols_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DOut + b * stride_dob + h * HEAD_DIM + rows[:, None] * stride_don + cols_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(Delta + pid_bh.to(tl.int64) * Nq + rows, delta, mask=row_ok)
    if GATE:
        g = tl.load(Gate + b * stride_gb + h * stride_gh + rows * stride_gn, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(DGate + (b * Nq + rows) * H + h, delta * (1.0 - tl.sigmoid(g)), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DOut, Lse, Delta, QCos, QSin, KCos, KSin, Gate, Bias, DK, DV,
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn, stride_dob, stride_don,
    stride_qrb, stride_qrh, stride_qrn, stride_qrd, stride_krb, stride_krh, stride_krn, stride_krd,
    stride_gb, stride_gn, stride_gh, stride_bb, stride_bn,
    stride_dks, stride_dkb, stride_dkn, stride_dvs, stride_dvb, stride_dvn,
    H, Nq, Nk, split_len, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    PAD_HALF: tl.constexpr, PAD_D: tl.constexpr,
    Q_ROPE: tl.constexpr, K_ROPE: tl.constexpr, GATE: tl.constexpr, BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of keys: dV = P^T dO and dK = scale * dS^T Q over the queries of split program_id(2) (scores
    transposed, keys on rows, so the accumulators stay in registers). With several splits DK and DV are fp32
    partial buffers [splits, B, Nk, H*D]."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    dtype = Q.dtype.element_ty

    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < Nk
    cols = tl.arange(0, BLOCK_HALF)
    half_ok = cols < HALF
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < HEAD_DIM

    kr_off = b * stride_krb + h * stride_krh
    k1, k2 = _load_head(K, KCos, KSin, b * stride_kb + h * HEAD_DIM, kr_off, keys, key_ok, cols, half_ok,
                        stride_kn, stride_krn, stride_krd, HALF, K_ROPE, MASK_N, PAD_HALF)
    v = _load2d(V + b * stride_vb + h * HEAD_DIM + keys[:, None] * stride_vn + cols_d[None, :], key_ok, d_ok, MASK_N,
                PAD_D)
    if BIAS:
        kb = _load1d(Bias + b * stride_bb + keys * stride_bn, key_ok, 0.0, MASK_N).to(tl.float32) * _LOG2E

    q_off = b * stride_qb + h * HEAD_DIM
    qr_off = b * stride_qrb + h * stride_qrh
    do_off = b * stride_dob + h * HEAD_DIM
    gate_off = b * stride_gb + h * stride_gh
    row_base = pid_bh.to(tl.int64) * Nq
    dk1 = tl.zeros([BLOCK_N, BLOCK_HALF], tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_HALF], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start = pid_s * split_len
    for start_m in range(start, tl.minimum(start + split_len, Nq), BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < Nq
        q1, q2 = _load_head(Q, QCos, QSin, q_off, qr_off, rows, row_ok, cols, half_ok, stride_qn, stride_qrn,
                            stride_qrd, HALF, Q_ROPE, MASK_M, PAD_HALF)
        do = _gated_grad(DOut, Gate, do_off, gate_off, rows, row_ok, cols_d, d_ok, stride_don, stride_gn, dtype,
                         GATE, MASK_M, PAD_D)
        # Rows past Nq load zero Q and dO, and lse = +inf so that p = 0 there even for a large positive bias.
        lse = _load1d(Lse + row_base + rows, row_ok, float("inf"), MASK_M)
        delta = _load1d(Delta + row_base + rows, row_ok, 0.0, MASK_M)
        st = tl.dot(k1, tl.trans(q1), input_precision=DOT_PRECISION)
        st = tl.dot(k2, tl.trans(q2), st, input_precision=DOT_PRECISION)
        st = st * qk_scale
        if BIAS:
            st = st + kb[:, None]
        pt = tl.exp2(st - lse[None, :])
        dv = tl.dot(pt.to(dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = (pt * (dpt - delta[None, :])).to(dtype)
        dk1 = tl.dot(dst, q1, dk1, input_precision=DOT_PRECISION)
        dk2 = tl.dot(dst, q2, dk2, input_precision=DOT_PRECISION)

    dk1 = dk1 * sm_scale
    dk2 = dk2 * sm_scale
    if K_ROPE:
        offs = kr_off + keys[:, None] * stride_krn + cols[None, :] * stride_krd
        dk1, dk2 = _rotate(dk1, dk2, KCos, KSin, offs, key_ok, half_ok, MASK_N, PAD_HALF, True)
    split = pid_s.to(tl.int64)
    dk_ptrs = DK + split * stride_dks + b * stride_dkb + h * HEAD_DIM + keys[:, None] * stride_dkn + cols[None, :]
    _store2d(dk_ptrs, dk1.to(DK.dtype.element_ty), key_ok, half_ok, MASK_N, PAD_HALF)
    _store2d(dk_ptrs + HALF, dk2.to(DK.dtype.element_ty), key_ok, half_ok, MASK_N, PAD_HALF)
    dv_ptrs = DV + split * stride_dvs + b * stride_dvb + h * HEAD_DIM + keys[:, None] * stride_dvn + cols_d[None, :]
    _store2d(dv_ptrs, dv.to(DV.dtype.element_ty), key_ok, d_ok, MASK_N, PAD_D)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DOut, Lse, Delta, QCos, QSin, KCos, KSin, Gate, Bias, DQ,
    stride_qb, stride_qn, stride_kb, stride_kn, stride_vb, stride_vn, stride_dob, stride_don,
    stride_qrb, stride_qrh, stride_qrn, stride_qrd, stride_krb, stride_krh, stride_krn, stride_krd,
    stride_gb, stride_gn, stride_gh, stride_bb, stride_bn,
    stride_dqs, stride_dqb, stride_dqn,
    H, Nq, Nk, split_len, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    PAD_HALF: tl.constexpr, PAD_D: tl.constexpr,
    Q_ROPE: tl.constexpr, K_ROPE: tl.constexpr, GATE: tl.constexpr, BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of queries: dQ = scale * dS K over the keys of split program_id(2). With several splits DQ is an
    fp32 partial buffer [splits, B, Nq, H*D]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    dtype = Q.dtype.element_ty

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Nq
    cols = tl.arange(0, BLOCK_HALF)
    half_ok = cols < HALF
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < HEAD_DIM

    qr_off = b * stride_qrb + h * stride_qrh
    q1, q2 = _load_head(Q, QCos, QSin, b * stride_qb + h * HEAD_DIM, qr_off, rows, row_ok, cols, half_ok,
                        stride_qn, stride_qrn, stride_qrd, HALF, Q_ROPE, MASK_M, PAD_HALF)
    do = _gated_grad(DOut, Gate, b * stride_dob + h * HEAD_DIM, b * stride_gb + h * stride_gh, rows, row_ok, cols_d,
                     d_ok, stride_don, stride_gn, dtype, GATE, MASK_M, PAD_D)
    row_base = pid_bh.to(tl.int64) * Nq
    lse = _load1d(Lse + row_base + rows, row_ok, float("inf"), MASK_M)  # p = 0 on rows past Nq
    delta = _load1d(Delta + row_base + rows, row_ok, 0.0, MASK_M)

    k_off = b * stride_kb + h * HEAD_DIM
    kr_off = b * stride_krb + h * stride_krh
    v_ptr = V + b * stride_vb + h * HEAD_DIM
    dq1 = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
    start = pid_s * split_len
    for start_n in range(start, tl.minimum(start + split_len, Nk), BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < Nk
        k1, k2 = _load_head(K, KCos, KSin, k_off, kr_off, keys, key_ok, cols, half_ok, stride_kn, stride_krn,
                            stride_krd, HALF, K_ROPE, MASK_N, PAD_HALF)
        v = _load2d(v_ptr + keys[:, None] * stride_vn + cols_d[None, :], key_ok, d_ok, MASK_N, PAD_D)
        s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=DOT_PRECISION)
        s = s * qk_scale
        if BIAS:
            kb = _load1d(Bias + b * stride_bb + keys * stride_bn, key_ok, 0.0, MASK_N).to(tl.float32)
            s = s + (kb * _LOG2E)[None, :]
        # Keys past Nk need no mask here: their K rows load as zeros, so they add nothing to dQ.
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(dtype)
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PRECISION)
        dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PRECISION)

    dq1 = dq1 * sm_scale
    dq2 = dq2 * sm_scale
    if Q_ROPE:
        offs = qr_off + rows[:, None] * stride_qrn + cols[None, :] * stride_qrd
        dq1, dq2 = _rotate(dq1, dq2, QCos, QSin, offs, row_ok, half_ok, MASK_M, PAD_HALF, True)
    split = pid_s.to(tl.int64)
    dq_ptrs = DQ + split * stride_dqs + b * stride_dqb + h * HEAD_DIM + rows[:, None] * stride_dqn + cols[None, :]
    _store2d(dq_ptrs, dq1.to(DQ.dtype.element_ty), row_ok, half_ok, MASK_M, PAD_HALF)
    _store2d(dq_ptrs + HALF, dq2.to(DQ.dtype.element_ty), row_ok, half_ok, MASK_M, PAD_HALF)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration: autotuned on the GPU (keyed on the sequence lengths, split, head size and features), one
# fixed small tiling in the interpreter (where every config would be "benchmarked" on the CPU).

_MASKS = {"MASK_M": lambda a: a["Nq"] % a["BLOCK_M"] != 0, "MASK_N": lambda a: a["Nk"] % a["BLOCK_N"] != 0}
_TUNE_KEY = ["Nq", "Nk", "split_len", "HEAD_DIM", "Q_ROPE", "K_ROPE", "GATE", "BIAS"]
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}
AUTOTUNE = True
"""False: every launch takes the first (safe) config of its list without benchmarking (GPU tests, quick runs)."""
SPLIT_PROGRAMS: Optional[int] = None
"""How many programs a launch should reach by splitting the swept sequence; None: twice the GPU's SMs (16 in the
interpreter). 1 never splits."""


def _configs(rows):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in rows]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). Every block size divides _SPLIT_UNIT. The rows of every product are
# >= 64 (query blocks in the forward and dQ, key blocks in dK/dV), which keeps Hopper's wgmma. Configs that overflow
# shared memory for a variant (the RoPE variants stage fp32 cos/sin tiles too) are skipped by the autotuner; the
# first of each list fits every variant without register spills (compiled for sm_90 with Triton 3.8;
# scripts/bench_attention.py --disasm shows what the GPU's Triton makes).
_SPLIT_UNIT = 128
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3)])
# dK/dV holds a key block and three fp32 accumulators (both dK halves, dV) for the whole sweep: short query blocks.
_DKDV_CONFIGS = _configs([(32, 64, 8, 2), (32, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 2)])
_DQ_CONFIGS = _configs([(64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 128, 8, 2)])

_fwd_masked = triton.heuristics(_MASKS)(_attn_fwd)
_dkdv_masked = triton.heuristics(_MASKS)(_attn_bwd_dkdv)
_dq_masked = triton.heuristics(_MASKS)(_attn_bwd_dq)
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_TUNE_KEY)(_fwd_masked)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_TUNE_KEY)(_dkdv_masked)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_TUNE_KEY)(_dq_masked)


def _launch(tuned, masked, grid_rows, batch_heads, splits, *args, **kwargs):
    """Runs a kernel over (row blocks, batch*heads, splits), autotuned on the GPU, fixed tiles in the interpreter."""
    if _interpreting():
        masked[(grid_rows(INTERPRETER_BLOCKS), batch_heads, splits)](*args, **kwargs, **INTERPRETER_BLOCKS)
    elif not AUTOTUNE:
        config = tuned.configs[0]
        masked[(grid_rows(config.kwargs), batch_heads, splits)](
            *args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        tuned[lambda meta: (grid_rows(meta), batch_heads, splits)](*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split(stationary: int, swept: int, batch_heads: int, device: torch.device) -> tuple[int, int]:
    """(splits, split_len) for a kernel that holds blocks of the stationary sequence and sweeps the other one.

    A video-to-audio attention has 126 queries against 6144 keys: 32 heads give 32 query blocks, a quarter of an
    H100, each sweeping every key. Cutting the sweep into splits (at least 512 long, a multiple of every block size)
    fills the GPU; the splits' partial results are merged by a small kernel.
    """
    interpreting = _interpreting()
    unit = max(INTERPRETER_BLOCKS.values()) if interpreting else _SPLIT_UNIT
    target = SPLIT_PROGRAMS or (16 if interpreting else 2 * _sm_count(device.index or 0))
    programs = batch_heads * triton.cdiv(stationary, unit)
    splits = max(1, min(target // programs, triton.cdiv(swept, unit if interpreting else 4 * unit), 16))
    split_len = triton.cdiv(triton.cdiv(swept, splits), unit) * unit
    return triton.cdiv(swept, split_len), split_len


# ----------------------------------------------------------------------------------------------------------------
# Host side


class _Geometry:
    """Sizes and compile-time flags shared by the forward and backward launches."""

    def __init__(self, q, k, heads, q_cos, k_cos, gate, bias):
        self.batch, self.nq, width = q.shape
        self.nk = k.shape[1]
        self.head_dim = width // heads
        # Tiles are at least 16 wide (the smallest tl.dot depth); narrower heads are zero-padded by masked loads.
        half = self.head_dim // 2
        block_half, block_d = max(16, half), max(16, self.head_dim)
        self.flags = dict(
            HEAD_DIM=self.head_dim, HALF=half, BLOCK_HALF=block_half, BLOCK_D=block_d,
            PAD_HALF=block_half != half, PAD_D=block_d != self.head_dim,
            Q_ROPE=q_cos is not None, K_ROPE=k_cos is not None, GATE=gate is not None, BIAS=bias is not None,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        )
        self.sm_scale = 1.0 / math.sqrt(self.head_dim)
        self.batch_heads = self.batch * heads

    def query_blocks(self, meta):
        return triton.cdiv(self.nq, meta["BLOCK_M"])

    def key_blocks(self, meta):
        return triton.cdiv(self.nk, meta["BLOCK_N"])


def _common_args(q, k, v, q_cos, q_sin, k_cos, k_sin, gate, bias):
    """The rope, gate and bias pointers and the strides every attention kernel takes, in kernel order; an absent
    tensor passes q as a never-read placeholder with zero strides."""
    pointers = tuple(t if t is not None else q for t in (q_cos, q_sin, k_cos, k_sin, gate, bias))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    extra = (tuple(q_cos.stride()) if q_cos is not None else (0, 0, 0, 0)) \
        + (tuple(k_cos.stride()) if k_cos is not None else (0, 0, 0, 0)) \
        + (tuple(gate.stride()) if gate is not None else (0, 0, 0)) \
        + (tuple(bias.stride()) if bias is not None else (0, 0))
    return pointers, strides, extra


def _output(shape, dtype, splits, device):
    """The tensor a kernel writes, with its (split, batch, row) strides: the result itself, or with several splits
    an fp32 buffer of partial results [splits, *shape]."""
    if splits == 1:
        out = torch.empty(shape, dtype=dtype, device=device)
        return out, (0, out.stride(0), out.stride(1))
    part = torch.empty((splits, *shape), dtype=torch.float32, device=device)
    return part, (part.stride(0), part.stride(1), part.stride(2))


def _device_guard(t):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@torch.library.custom_op("ltx_lora::fused_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_cos: Optional[torch.Tensor],
                q_sin: Optional[torch.Tensor], k_cos: Optional[torch.Tensor], k_sin: Optional[torch.Tensor],
                gate: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Nq, H*D] and the rows' log2-sum-exp [B, H, Nq] (fp32) that the backward recomputes P from."""
    geo = _Geometry(q, k, heads, q_cos, k_cos, gate, bias)
    splits, split_len = _split(geo.nq, geo.nk, geo.batch_heads, q.device)
    pointers, strides, extra = _common_args(q, k, v, q_cos, q_sin, k_cos, k_sin, gate, bias)
    dst, (stride_os, stride_ob, stride_on) = _output(q.shape, q.dtype, splits, q.device)
    dst_lse, (stride_ls, _, _) = _output((geo.batch, heads, geo.nq), torch.float32, splits, q.device)
    flags = dict(geo.flags, GATE=geo.flags["GATE"] and splits == 1)  # the merge gates a split output
    with _device_guard(q):
        _launch(_fwd_tuned, _fwd_masked, geo.query_blocks, geo.batch_heads, splits,
                q, k, v, dst, dst_lse, *pointers, *strides, stride_ob, stride_on, *extra, stride_os, stride_ls,
                heads, geo.nq, geo.nk, split_len, geo.sm_scale * 1.4426950408889634, **flags)
        if splits == 1:
            return dst, dst_lse
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((geo.batch, heads, geo.nq), dtype=torch.float32, device=q.device)
        block = 32
        _attn_fwd_combine[(triton.cdiv(geo.nq, block), geo.batch_heads)](
            dst, dst_lse, out, lse, pointers[4], dst.stride(0), dst.stride(1), dst.stride(2), dst_lse.stride(0),
            out.stride(0), out.stride(1), *extra[8:11], heads, geo.nq, splits,
            HEAD_DIM=geo.head_dim, BLOCK_D=geo.flags["BLOCK_D"], GATE=gate is not None, BLOCK_M=block)
    return out, lse


@_forward_op.register_fake
def _(q, k, v, q_cos, q_sin, k_cos, k_sin, gate, bias, heads):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], heads, q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("ltx_lora::fused_attention_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, q_cos: Optional[torch.Tensor], q_sin: Optional[torch.Tensor],
                 k_cos: Optional[torch.Tensor], k_sin: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    """dq, dk, dv in the inputs' dtype and the gate's gradient in fp32 ([B, Nq, H], empty without a gate)."""
    geo = _Geometry(q, k, heads, q_cos, k_cos, gate, bias)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    pointers, strides, extra = _common_args(q, k, v, q_cos, q_sin, k_cos, k_sin, gate, bias)
    delta = torch.empty_like(lse)
    dgate = torch.empty((geo.batch, geo.nq, heads) if gate is not None else (0,), dtype=torch.float32,
                        device=q.device)
    scales = (geo.sm_scale * 1.4426950408889634, geo.sm_scale)
    do_strides = (grad_out.stride(0), grad_out.stride(1))
    kv_splits, kv_split_len = _split(geo.nk, geo.nq, geo.batch_heads, q.device)
    q_splits, q_split_len = _split(geo.nq, geo.nk, geo.batch_heads, q.device)
    dk_dst, dk_strides = _output(k.shape, k.dtype, kv_splits, q.device)
    dv_dst, dv_strides = _output(v.shape, v.dtype, kv_splits, q.device)
    dq_dst, dq_strides = _output(q.shape, q.dtype, q_splits, q.device)
    with _device_guard(q):
        block = 64
        _attn_bwd_preprocess[(triton.cdiv(geo.nq, block), geo.batch_heads)](
            out, grad_out, delta, pointers[4], dgate, out.stride(0), out.stride(1), *do_strides, *extra[8:11],
            heads, geo.nq, HEAD_DIM=geo.head_dim, BLOCK_D=geo.flags["BLOCK_D"], GATE=gate is not None,
            BLOCK_M=block)
        inputs = (q, k, v, grad_out, lse, delta, *pointers)
        _launch(_dkdv_tuned, _dkdv_masked, geo.key_blocks, geo.batch_heads, kv_splits,
                *inputs, dk_dst, dv_dst, *strides, *do_strides, *extra, *dk_strides, *dv_strides,
                heads, geo.nq, geo.nk, kv_split_len, *scales, **geo.flags)
        _launch(_dq_tuned, _dq_masked, geo.query_blocks, geo.batch_heads, q_splits,
                *inputs, dq_dst, *strides, *do_strides, *extra, *dq_strides,
                heads, geo.nq, geo.nk, q_split_len, *scales, **geo.flags)
        grads = []
        for dst, like, splits in ((dq_dst, q, q_splits), (dk_dst, k, kv_splits), (dv_dst, v, kv_splits)):
            if splits > 1:
                total = torch.empty(like.shape, dtype=like.dtype, device=like.device)
                _sum_splits[(triton.cdiv(total.numel(), 1024),)](dst, total, total.numel(), splits, BLOCK=1024)
                dst = total
            grads.append(dst)
    return (*grads, dgate)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, q_cos, q_sin, k_cos, k_sin, gate, bias, heads):
    dgate_shape = (q.shape[0], q.shape[1], heads) if gate is not None else (0,)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(dgate_shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, q_cos, q_sin, k_cos, k_sin, gate, bias, heads = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_cos, q_sin, k_cos, k_sin, gate, bias)
    ctx.heads = heads
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, q_cos, q_sin, k_cos, k_sin, gate, bias = ctx.saved_tensors
    dq, dk, dv, dgate = torch.ops.ltx_lora.fused_attention_backward(
        grad_out, q, k, v, out, lse, q_cos, q_sin, k_cos, k_sin, gate, bias, ctx.heads)
    dgate = dgate.to(gate.dtype) if gate is not None else None
    return dq, dk, dv, None, None, None, None, dgate, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point


def _check_rope(name, rope, batch, heads, length, half):
    """The (cos, sin) pair broadcast to [B, H, N, D/2] (a view: a shared table keeps its zero strides)."""
    if rope is None:
        return None, None
    cos, sin = rope
    if cos.dim() != 4 or sin.shape != cos.shape:
        raise ValueError(f"{name}: expected (cos, sin) of shape [B, H, N, D/2] = [{batch}, {heads}, {length}, "
                         f"{half}] (split RoPE), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    try:
        cos, sin = cos.expand(batch, heads, length, half), sin.expand(batch, heads, length, half)
    except RuntimeError:
        raise ValueError(f"{name}: (cos, sin) of shape {tuple(cos.shape)} does not broadcast to [B, H, N, D/2] = "
                         f"[{batch}, {heads}, {length}, {half}]") from None
    if cos.dtype not in (torch.float32, torch.bfloat16, torch.float16) or sin.dtype != cos.dtype:
        raise ValueError(f"{name}: cos and sin must share a float32/bfloat16/float16 dtype, got {cos.dtype} and "
                         f"{sin.dtype}")
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_rope=None, k_rope=None,
                    gate_logits: Optional[torch.Tensor] = None, key_bias: Optional[torch.Tensor] = None,
                    heads: int) -> torch.Tensor:
    """softmax(rope(q) rope(k)^T / sqrt(D) + key_bias) v, times 2*sigmoid(gate_logits) per head.

    q: [B, Nq, H*D]; k, v: [B, Nk, H*D], as the projections produce them (any strides with a unit last stride).
    q_rope / k_rope: (cos, sin) of shape [B, H, N, D/2] as diffusers' LTX-2 split RoPE makes them, or None for no
    rotation. gate_logits: [B, Nq, H] or None. key_bias: additive bias [B, Nk] (0 keeps a key, a large negative
    finite value such as the model's -10000 drops it) or None. Returns [B, Nq, H*D] in q's dtype; gradients flow
    to q, k, v (unrotated) and gate_logits.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be [B, N, H*D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    batch, nq, width = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2] != width:
        raise ValueError(f"k and v must be [B, Nk, H*D] matching q {tuple(q.shape)}; got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    nk = k.shape[1]
    if nq == 0 or nk == 0:
        raise ValueError(f"empty sequence: Nq={nq}, Nk={nk}")
    if width % heads != 0:
        raise ValueError(f"width {width} is not a multiple of heads={heads}")
    head_dim = width // heads
    if head_dim < 8 or head_dim > 128 or head_dim & (head_dim - 1):
        raise ValueError(f"head dim {head_dim} is not supported: it must be a power of two from 8 to 128 (LTX-2 uses "
                         f"128 and 64)")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a bfloat16/float16/float32 dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit last-dimension stride (heads are indexed by stride); got "
                             f"strides {t.stride()}")
        if t.device != q.device:
            raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if not q.is_cuda and not _interpreting():
        raise ValueError(f"fused_attention runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1); got "
                         f"{q.device}")
    half = head_dim // 2
    q_cos, q_sin = _check_rope("q_rope", q_rope, batch, heads, nq, half)
    k_cos, k_sin = _check_rope("k_rope", k_rope, batch, heads, nk, half)
    if gate_logits is not None:
        if gate_logits.shape != (batch, nq, heads):
            raise ValueError(f"gate_logits must be [B, Nq, H] = [{batch}, {nq}, {heads}], got "
                             f"{tuple(gate_logits.shape)}")
        if not gate_logits.is_floating_point():
            raise ValueError(f"gate_logits must be floating point, got {gate_logits.dtype}")
    if key_bias is not None:
        if key_bias.dim() != 2 or key_bias.shape[1] != nk or key_bias.shape[0] not in (1, batch):
            raise ValueError(f"key_bias must be [B, Nk] = [{batch}, {nk}] (or [1, Nk]), got {tuple(key_bias.shape)}")
        if not key_bias.is_floating_point():
            raise ValueError(f"key_bias must be an additive float bias, got {key_bias.dtype}")
        key_bias = key_bias.expand(batch, nk)
    out, _ = torch.ops.ltx_lora.fused_attention_forward(q, k, v, q_cos, q_sin, k_cos, k_sin, gate_logits, key_bias,
                                                        heads)
    return out
