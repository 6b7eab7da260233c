"""Benchmark: the fp8 base Linear (trainer/fp8.py) against bf16, product by product, at the block's shapes.

For each product shape of an LTX-2.3 block at the standard shape (6144 video tokens, 1024 text tokens, 126 audio
tokens) it times, on one GPU, median of repeats (triton.testing.do_bench):
  - the bare products, inputs already in their format: bf16 `x @ W^T` (forward) and `dy @ W` (input gradient),
    fp8 with one scale per tensor (what trainer/fp8.py runs) and fp8 with a scale per row and per output channel
    (what it ran before 2026-11-27, seventh session), the fp8 weight already transposed for the input gradient;
  - the whole frozen Linear, forward and input gradient, compiled (`torch.compile`) as the trainer's blocks are: a
    bf16 `nn.Linear` against `Fp8Linear`, which quantizes its input and gradient and transposes its weight;
and the norm-wise relative error of the fp8 Linear's output and input gradient against a float32 reference.

    python scripts/bench_fp8.py
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from trainer.fp8 import FP8, Fp8Linear, _quantize

# (rows, in features, out features, what): the products of one LTX-2.3 block, standard shape.
SHAPES = [
    (6144, 4096, 4096, "video attention q/k/v/out"),
    (6144, 4096, 16384, "video feed-forward up"),
    (6144, 16384, 4096, "video feed-forward down"),
    (1024, 4096, 4096, "text keys/values"),
    (6144, 4096, 2048, "video keys/values for audio"),
    (126, 2048, 2048, "audio attention"),
    (126, 2048, 8192, "audio feed-forward up"),
]


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(FP8).max
    return (x.float() / scale).to(FP8), scale


def bare_products(m: int, k: int, n: int) -> dict[str, float]:
    """Milliseconds of the forward and input-gradient products alone, in bf16 and both fp8 scalings."""
    x, w, dy = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for shape in ((m, k), (n, k), (m, n)))
    bf16 = torch.bfloat16
    xq, xs = _quantize(x)
    wq, ws = _quantize(w)
    dq, ds = _quantize(dy)
    w_col = wq.t().contiguous().t()
    xr, xrs = _quantize_rows(x)
    wr, wrs = _quantize_rows(w)
    dr, drs = _quantize_rows(dy)
    ones = torch.ones(1, k, device="cuda")
    return {
        "bf16 fwd": do_bench(lambda: x @ w.t(), return_mode="median"),
        "bf16 dx": do_bench(lambda: dy @ w, return_mode="median"),
        "fp8 tensor fwd": do_bench(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=bf16),
                                   return_mode="median"),
        "fp8 tensor dx": do_bench(lambda: torch._scaled_mm(dq, w_col, scale_a=ds, scale_b=ws, out_dtype=bf16),
                                  return_mode="median"),
        "fp8 row fwd": do_bench(lambda: torch._scaled_mm(xr, wr.t(), scale_a=xrs, scale_b=wrs.t(), out_dtype=bf16),
                                return_mode="median"),
        "fp8 row dx": do_bench(lambda: torch._scaled_mm(dr, w_col, scale_a=drs, scale_b=ones, out_dtype=bf16),
                               return_mode="median"),
    }


def whole_linear(m: int, k: int, n: int) -> dict[str, float]:
    """Milliseconds of a frozen Linear's forward and input gradient, compiled, bf16 against fp8; and fp8's error."""
    linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    fp8 = Fp8Linear(linear)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def step(module):
        compiled = torch.compile(module, dynamic=False)

        def run():
            y = compiled(x)
            return y, torch.autograd.grad(y, x, dy)[0]
        return run

    out = {}
    for name, module in (("bf16", linear), ("fp8", fp8)):
        run = step(module)
        run()
        out[f"{name} linear"] = do_bench(run, return_mode="median")
    y, dx = step(fp8)()
    exact_x = x.detach().float().requires_grad_(True)
    exact = exact_x @ linear.weight.float().t()
    (exact_dx,) = torch.autograd.grad(exact, exact_x, dy.float())
    out["fp8 out error"] = ((y.float() - exact).norm() / exact.norm()).item()
    out["fp8 dx error"] = ((dx.float() - exact_dx).norm() / exact_dx.norm()).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    print(f"FP8 {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for m, k, n, what in SHAPES:
        times = bare_products(m, k, n) | whole_linear(m, k, n)
        tflops = {key: 2 * m * k * n / (ms * 1e9) for key, ms in times.items() if "fwd" in key or "dx" in key}
        print(f"FP8 {m}x{k}x{n} ({what}): " + ", ".join(
            f"{key} {value:.4f}" if "error" in key else f"{key} {value:.3f} ms" + (
                f" ({tflops[key]:.0f} TFLOP/s)" if key in tflops else "") for key, value in times.items()),
            flush=True)


if __name__ == "__main__":
    main()
