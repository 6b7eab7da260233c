"""ltx_kernels/residual.py against the float64 reference: forward and every gradient, per-token and broadcast gates.
Without CUDA the kernels run in Triton's interpreter at small sizes in fp32 and fp16 (the interpreter mishandles bf16
loads); with CUDA the same tests also run at the model's sizes and in bf16."""

import pytest
import torch

import norm_reference as ref
from ltx_kernels.residual import gated_residual

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Odd token counts, a width that is no power of two, the audio and video widths; B = 2 also with strided rows.
SHAPES = [(1, 1, 16), (2, 37, 48), (1, 130, 16), (2, 130, 48), (1, 7, 2048), (2, 37, 2048), (2, 3, 4096)]
if CUDA:
    SHAPES += [(2, 6144, 4096), (1, 14720, 4096), (1, 126, 2048), (2, 6144, 2048)]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
GATES = ["token", "sample", "shared", "positions"]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    ref.poison_empty(monkeypatch)


def check(x, y, gate, dout):
    out = gated_residual(x, y, gate)
    out_ref, grads_ref = ref.reference_grads(ref.gated_residual, [x, y, gate], dout)
    ref.assert_close(out, out_ref, "out")
    assert out.dtype == x.dtype
    for name, grad, grad_ref in zip(["dx", "dy", "dgate"], torch.autograd.grad(out, (x, y, gate), dout), grads_ref):
        ref.assert_close(grad, grad_ref, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, gate, dtype):
    B, N, C = shape
    x = ref.activation(B, N, C, dtype, DEVICE, strided=B == 2).requires_grad_()
    y = ref.activation(B, N, C, dtype, DEVICE, strided=B == 2).requires_grad_()
    check(x, y, ref.table(gate, B, N, C, dtype, DEVICE).requires_grad_(),
          ref.activation(B, N, C, dtype, DEVICE, strided=B == 2))


def test_gate_in_another_dtype():
    """An fp32 gate on fp16 activations: out in x's dtype, each gradient in its input's dtype."""
    B, N, C = 2, 37, 48
    x = ref.activation(B, N, C, torch.float16, DEVICE).requires_grad_()
    y = ref.activation(B, N, C, torch.float16, DEVICE).requires_grad_()
    check(x, y, ref.table("sample", B, N, C, torch.float32, DEVICE).requires_grad_(),
          ref.activation(B, N, C, torch.float16, DEVICE))


@pytest.mark.parametrize("wanted", [(True, True, False), (True, False, False), (False, True, False),
                                    (False, False, True)], ids=["x, y (LoRA: gate frozen)", "x", "y", "gate"])
def test_computes_only_requested_grads(wanted):
    B, N, C = 2, 37, 48
    inputs = [ref.activation(B, N, C, torch.float32, DEVICE), ref.activation(B, N, C, torch.float32, DEVICE),
              ref.table("sample", B, N, C, torch.float32, DEVICE)]
    for t, want in zip(inputs, wanted):
        t.requires_grad_(want)
    dout = ref.activation(B, N, C, torch.float32, DEVICE)
    gated_residual(*inputs).backward(dout)
    _, grads_ref = ref.reference_grads(ref.gated_residual, inputs, dout)
    for name, t, want, grad_ref in zip(["dx", "dy", "dgate"], inputs, wanted, grads_ref):
        if want:
            ref.assert_close(t.grad, grad_ref, name)
        else:
            assert t.grad is None


def test_frozen_gate_does_not_keep_y():
    """In LoRA training the gate is frozen: y (an attention or feed-forward output) need not outlive the forward."""
    B, N, C = 2, 37, 48
    x, y = (ref.activation(B, N, C, torch.float32, DEVICE).requires_grad_() for _ in range(2))
    saved_y, saved_gate = gated_residual(x, y, ref.table("token", B, N, C, torch.float32, DEVICE)).grad_fn.saved_tensors
    assert saved_y is None and saved_gate is not None


@pytest.mark.parametrize("x_shape, y_shape, gate_shape, dtype, error", [
    ((37, 48), (37, 48), (37, 48), torch.float32, r"x must be \[B, N, C\]"),
    ((2, 37, 48), (2, 36, 48), (2, 37, 48), torch.float32, r"y must have x's shape"),
    ((2, 37, 48), (2, 37, 48), (2, 37, 1), torch.float32, r"gate must be \[2 or 1, 37 or 1, 48\]"),
    ((2, 37, 48), (2, 37, 48), (2, 37, 48), torch.float64, r"dtype torch.float64"),
])
def test_rejects_unsupported_inputs(x_shape, y_shape, gate_shape, dtype, error):
    x, y = torch.randn(x_shape, dtype=dtype, device=DEVICE), torch.randn(y_shape, dtype=dtype, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=error):
        gated_residual(x, y, torch.randn(gate_shape, dtype=dtype, device=DEVICE))
