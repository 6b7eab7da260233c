"""Rectified flow: the sigma sampler matches its distribution, noising and targets, and the masked loss."""

import math

import numpy as np
import pytest
import torch

from trainer import flow

EPS = 1e-3
N = 200_000


def _phi(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF."""
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _expected_cdf(x: np.ndarray, num_tokens: int) -> np.ndarray:
    """P(sigma <= x) for eps <= x < 1, derived independently of the implementation.

    With T = (sigmoid(Z) - p_lo) / (p_hi - p_lo), Z ~ N(mu, 1): the reflection sends T < eps to 2 eps - T and
    T > 1 to 2 - T, so sigma <= x exactly when 2 eps - x <= T <= x, or T >= 2 - x.
    """
    mu = 0.95 + (num_tokens - 1024) * 1.1 / 3072
    p_lo = 1 / (1 + math.exp(-(mu - 2.5758293035489004)))  # Phi^-1(0.005) = -2.5758...
    p_hi = 1 / (1 + math.exp(-(mu + 3.090232306167813)))  # Phi^-1(0.999) = 3.0902...

    def cdf_t(t: np.ndarray) -> np.ndarray:
        q = p_lo + t * (p_hi - p_lo)
        inside = np.clip(q, 1e-300, 1 - 1e-16)
        values = _phi(np.log(inside / (1 - inside)) - mu)
        return np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, values))

    return cdf_t(x) - cdf_t(2 * EPS - x) + (1 - cdf_t(2 - x))


def _draw(num_tokens: int, uniform_prob: float, seed: int = 0, n: int = N) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return flow.sample_sigmas(num_tokens, n, generator, uniform_prob=uniform_prob, eps=EPS).double().numpy()


def test_shift_mu_anchors_and_extrapolation():
    assert flow.shift_mu(1024) == pytest.approx(0.95)
    assert flow.shift_mu(4096) == pytest.approx(2.05)
    assert flow.shift_mu(6144) == pytest.approx(0.95 + 5120 * 1.1 / 3072)
    assert flow.shift_mu(256) == pytest.approx(0.95 - 768 * 1.1 / 3072)


@pytest.mark.parametrize("num_tokens", [1024, 6144])
def test_sampler_matches_the_stretched_reflected_logit_normal(num_tokens):
    samples = np.sort(_draw(num_tokens, uniform_prob=0.0))
    grid = np.linspace(EPS, 1 - 1e-6, 400)
    empirical = np.searchsorted(samples, grid, side="right") / len(samples)
    # DKW: with 200k samples a gap over 0.004 has probability 0.3%; clamping instead of reflecting gives 0.005.
    assert np.abs(empirical - _expected_cdf(grid, num_tokens)).max() < 0.004


def test_mean_sigma_grows_with_tokens():
    means = [_draw(n, uniform_prob=0.1, n=50_000).mean() for n in (256, 1024, 4096, 6144)]
    assert means == sorted(means) and means[-1] - means[0] > 0.1


def test_uniform_draws_are_uniform_on_eps_to_one():
    samples = np.sort(_draw(1024, uniform_prob=1.0))
    expected = (samples - EPS) / (1 - EPS)
    empirical = np.arange(1, len(samples) + 1) / len(samples)
    assert np.abs(empirical - expected).max() < 0.01


def test_uniform_fraction():
    # At 6144 tokens the logit-normal puts almost no mass below 0.3; a tenth of U(eps, 1) puts 0.1 * 0.3 there.
    below = (_draw(6144, uniform_prob=0.1) < 0.3).mean()
    logit_normal_below = (_draw(6144, uniform_prob=0.0) < 0.3).mean()
    assert below - 0.9 * logit_normal_below == pytest.approx(0.1 * (0.3 - EPS) / (1 - EPS), abs=0.003)


@pytest.mark.parametrize("num_tokens", [16, 1024, 100_000])
def test_range_dtype_and_reproducibility(num_tokens):
    generator = torch.Generator().manual_seed(7)
    sigmas = flow.sample_sigmas(num_tokens, 10_000, generator)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (10_000,)
    assert sigmas.min() >= EPS and sigmas.max() <= 1.0
    again = flow.sample_sigmas(num_tokens, 10_000, torch.Generator().manual_seed(7))
    assert torch.equal(sigmas, again)
    assert not torch.equal(sigmas, flow.sample_sigmas(num_tokens, 10_000, torch.Generator().manual_seed(8)))


def test_random_stream_does_not_depend_on_uniform_prob():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    flow.sample_sigmas(1024, 5, g1, uniform_prob=0.0)
    flow.sample_sigmas(1024, 5, g2, uniform_prob=1.0)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_noise_and_velocity_target():
    x0, noise = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    xt = flow.add_noise(x0, noise, sigma)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], noise[2])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    v = flow.velocity_target(x0, noise)
    # The velocity is the derivative of x_t along sigma.
    torch.testing.assert_close(flow.add_noise(x0, noise, sigma + 0.1) - xt, 0.1 * v)


def test_masked_tokens_neither_count_nor_get_gradient():
    pred = torch.randn(2, 6, 4, requires_grad=True)
    target = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    loss = flow.masked_mse(pred, target, mask)
    keep = mask.bool()
    assert loss.item() == pytest.approx(((pred - target)[keep] ** 2).mean().item(), rel=1e-6)

    changed = target.clone()
    changed[~keep] += 100.0
    assert flow.masked_mse(pred, changed, mask).item() == pytest.approx(loss.item(), rel=1e-6)

    loss.backward()
    assert torch.all(pred.grad[~keep] == 0) and torch.all(pred.grad[keep] != 0)


def test_all_zero_mask_gives_zero_with_a_gradient_path():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    loss = flow.masked_mse(pred, torch.randn(2, 3, 4), torch.zeros(2, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(pred.grad == 0)


def test_bf16_inputs_give_an_fp32_loss():
    pred, target = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    mask = torch.ones(2, 8, dtype=torch.bfloat16)
    loss = flow.masked_mse(pred.bfloat16(), target.bfloat16(), mask)
    assert loss.dtype == torch.float32
    exact = ((pred.bfloat16().float() - target.bfloat16().float()) ** 2).mean()
    assert loss.item() == pytest.approx(exact.item(), rel=1e-6)
