"""fp8 base Linears (`train.fp8`): each product and its input gradient stay within 5% of the exact product, only
frozen Linears of the blocks are replaced, the tiny model's output stays within 5% of the plain model's, and a run
with fp8 trains (the learning test in tests/test_learning.py runs with it too)."""

import pytest
import torch

from tiny_training import lora_model, step_inputs
from trainer.config import ConfigError, resolve
from trainer.fp8 import Fp8Linear, check_fp8_device, use_fp8_base_linears
from trainer.lora import lora_parameters
from trainer.train import train

BOUND = 0.05  # norm-wise relative error of an fp8 product (e4m3: 3 mantissa bits), typically 0.035


def _relative(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("rows, k, n, dtype", [(300, 256, 512, torch.bfloat16), (7, 64, 48, torch.bfloat16),
                                               (126, 128, 64, torch.float32)])
def test_an_fp8_product_and_its_input_gradient_stay_within_the_bound(rows, k, n, dtype):
    g = torch.Generator().manual_seed(rows)
    linear = torch.nn.Linear(k, n).to(dtype).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=g) * k ** -0.5)
        linear.weight[:, 0] *= 20  # an outlier input channel
    fp8 = Fp8Linear(linear)
    x = (torch.randn(2, rows, k, generator=g) * 3).to(dtype).requires_grad_(True)
    x.data[0, 0] *= 50  # an outlier token: fp8 floats keep the others' relative precision under its scale
    y = fp8(x)
    grad = torch.randn(y.shape, generator=g).to(y.dtype)
    y.backward(grad)
    exact_x = x.detach().double().requires_grad_(True)
    exact = torch.nn.functional.linear(exact_x, linear.weight.double(), linear.bias.double())
    exact.backward(grad.double())
    assert y.dtype == torch.bfloat16 and x.grad.dtype == dtype and fp8.weight.dtype == torch.float8_e4m3fn
    assert fp8.weight_scale.shape == ()  # one scale for the tensor: the product applies it for free
    assert 1e-3 < _relative(y, exact) < BOUND  # quantized (not the exact product), within the bound
    assert 1e-3 < _relative(x.grad, exact_x.grad) < BOUND
    assert _relative(y[1], exact[1]) < BOUND  # the sample without the outlier token too


def test_only_the_frozen_linears_of_the_blocks_turn_fp8_and_the_model_stays_within_the_bound():
    plain, model = lora_model(), lora_model()
    frozen = {name: m for name, m in model.transformer_blocks.named_modules()
              if type(m) is torch.nn.Linear and not m.weight.requires_grad}
    # fp8 tensor cores take sizes in multiples of 16: the per-head gate logits (2 heads here) stay as they are
    sizable = {name for name, m in frozen.items() if m.in_features % 16 == 0 and m.out_features % 16 == 0}
    assert sizable and "0.attn1.to_gate_logits" in set(frozen) - sizable
    assert use_fp8_base_linears(model) == len(sizable)
    blocks = dict(model.transformer_blocks.named_modules())
    assert {name for name, m in blocks.items() if isinstance(m, Fp8Linear)} == sizable
    assert all(type(blocks[name]) is torch.nn.Linear for name in blocks if name.endswith(("lora_A.default",
                                                                                          "lora_B.default")))
    assert type(model.proj_in) is torch.nn.Linear  # outside the blocks: untouched
    kwargs = step_inputs().model_kwargs
    want = plain(**kwargs)
    got = model(**kwargs)
    for a, b in zip(got, want):
        assert 1e-4 < _relative(a, b.double()) < BOUND
    sum(out.float().square().mean() for out in got).backward()
    grads = [p.grad for p in lora_parameters(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_a_gpu_without_fp8_tensor_cores_is_refused_naming_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"train\.fp8: NVIDIA A100.*8\.9.*train\.fp8: false"):
        check_fp8_device(torch.device("cuda"))
    check_fp8_device(torch.device("cpu"))  # the CPU runs the same arithmetic


def test_a_run_with_fp8_trains_and_exports(tmp_path):
    config = {
        "output_dir": str(tmp_path / "run"), "model": {"target": "tiny-ltx-2.3"}, "lora": {"rank": 4},
        "optim": {"learning_rate": 1e-3},
        "train": {"steps": 3, "batch_size": 2, "log_every": 1, "gradient_checkpointing": False, "fp8": True},
        "data": {"cache_dir": str(tmp_path / "cache"),
                 "synthetic": {"num_samples": 2, "frames": 9, "height": 64, "width": 96}},
    }
    result = train(resolve(config), progress=False)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "run" / "lora.safetensors").exists()
