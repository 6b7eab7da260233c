"""ltx_kernels/norm_modulate.py against the float64 reference: forward and every gradient, per-token and broadcast tables.
Without CUDA the kernels run in Triton's interpreter at small sizes in fp32 and fp16 (the interpreter mishandles bf16
loads); with CUDA the same tests also run at the model's sizes and in bf16."""

import pytest
import torch
from diffusers.models.normalization import RMSNorm

import norm_reference as ref
from ltx_kernels.norm_modulate import rms_norm_modulate

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Odd token counts, a width that is no power of two, the audio and video widths; B = 2 also with strided rows.
SHAPES = [(1, 1, 16), (2, 37, 48), (1, 130, 16), (2, 130, 48), (1, 7, 2048), (2, 37, 2048), (2, 3, 4096)]
if CUDA:
    SHAPES += [(2, 6144, 4096), (1, 14720, 4096), (1, 126, 2048), (2, 6144, 2048)]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TABLES = [("token", "token"), ("sample", "sample"), ("token", "sample"), ("shared", "positions")]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    ref.poison_empty(monkeypatch)


def check(x, scale, shift, dout, eps=1e-6):
    y = rms_norm_modulate(x, scale, shift, eps)
    y_ref, grads_ref = ref.reference_grads(lambda *t: ref.rms_norm_modulate(*t, eps), [x, scale, shift], dout)
    ref.assert_close(y, y_ref, "y")
    assert y.dtype == x.dtype
    for name, grad, grad_ref in zip(["dx", "dscale", "dshift"], torch.autograd.grad(y, (x, scale, shift), dout),
                                    grads_ref):
        ref.assert_close(grad, grad_ref, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tables", TABLES, ids="/".join)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, tables, dtype):
    B, N, C = shape
    x = ref.activation(B, N, C, dtype, DEVICE, strided=B == 2).requires_grad_()
    scale = ref.table(tables[0], B, N, C, dtype, DEVICE).requires_grad_()
    shift = ref.table(tables[1], B, N, C, dtype, DEVICE).requires_grad_()
    check(x, scale, shift, ref.activation(B, N, C, dtype, DEVICE, strided=B == 2))


def test_tables_in_another_dtype():
    """fp32 tables on fp16 activations: y in x's dtype, each gradient in its input's dtype."""
    B, N, C = 2, 37, 48
    x = ref.activation(B, N, C, torch.float16, DEVICE).requires_grad_()
    scale = ref.table("token", B, N, C, torch.float32, DEVICE).requires_grad_()
    shift = ref.table("sample", B, N, C, torch.float32, DEVICE).requires_grad_()
    check(x, scale, shift, ref.activation(B, N, C, torch.float16, DEVICE), eps=1e-3)


@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["x (LoRA: tables frozen)", "scale", "shift"])
def test_computes_only_requested_grads(wanted):
    B, N, C = 2, 37, 48
    inputs = [ref.activation(B, N, C, torch.float32, DEVICE), ref.table("sample", B, N, C, torch.float32, DEVICE),
              ref.table("token", B, N, C, torch.float32, DEVICE)]
    for t, want in zip(inputs, wanted):
        t.requires_grad_(want)
    dout = ref.activation(B, N, C, torch.float32, DEVICE)
    rms_norm_modulate(*inputs).backward(dout)
    _, grads_ref = ref.reference_grads(ref.rms_norm_modulate, inputs, dout)
    for name, t, want, grad_ref in zip(["dx", "dscale", "dshift"], inputs, wanted, grads_ref):
        if want:
            ref.assert_close(t.grad, grad_ref, name)
        else:
            assert t.grad is None


def test_matches_the_diffusers_block():
    """The reference is what LTX2VideoTransformerBlock computes: norm(x) * (1 + scale) + shift."""
    B, N, C = 2, 37, 48
    x = ref.activation(B, N, C, torch.float32, DEVICE)
    scale = ref.table("token", B, N, C, torch.float32, DEVICE)
    shift = ref.table("sample", B, N, C, torch.float32, DEVICE)
    block = RMSNorm(C, eps=1e-6, elementwise_affine=False)(x) * (1 + scale) + shift
    torch.testing.assert_close(rms_norm_modulate(x, scale, shift), block, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape, table_shape, dtype, error", [
    ((37, 48), (37, 48), torch.float32, r"x must be \[B, N, C\]"),
    ((2, 37, 48), (2, 37, 47), torch.float32, r"scale must be \[2 or 1, 37 or 1, 48\]"),
    ((2, 37, 48), (3, 1, 48), torch.float32, r"scale must be"),
    ((2, 37, 48), (2, 36, 48), torch.float32, r"scale must be"),
    ((2, 37, 48), (2, 37, 48), torch.float64, r"dtype torch.float64"),
    ((1, 2, 8193), (1, 1, 8193), torch.float32, r"at most 8192"),
])
def test_rejects_unsupported_inputs(x_shape, table_shape, dtype, error):
    x = torch.randn(x_shape, dtype=dtype, device=DEVICE)
    table = torch.randn(table_shape, dtype=dtype, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=error):
        rms_norm_modulate(x, table, table)
