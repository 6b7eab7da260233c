"""Rectified flow: the sigma sampler, noising, velocity targets and the masked loss.

Convention: x_t = (1 - sigma) * x0 + sigma * noise, so sigma = 0 is clean data and sigma = 1 pure noise, and the
model predicts the velocity noise - x0.

Sigmas follow a shifted logit-normal whose centre grows with the token count (bigger clips need more noise to
destroy their structure), stretched so its 0.5th..99.9th percentiles span [0, 1], reflected into [eps, 1], and mixed
with 10% uniform draws so that every noise level keeps some training signal.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

# mu of the logit-normal at two token counts; linear in between and beyond.
_MU_ANCHORS = ((1024, 0.95), (4096, 2.05))
_STD = 1.0
# The percentiles of the logit-normal that the stretch maps to 0 and 1.
_Z_LO = NormalDist().inv_cdf(0.005)
_Z_HI = NormalDist().inv_cdf(0.999)


def shift_mu(num_tokens: int) -> float:
    """Centre of the logit-normal for a modality with `num_tokens` tokens (linear, extrapolated past the anchors)."""
    (n0, mu0), (n1, mu1) = _MU_ANCHORS
    return mu0 + (num_tokens - n0) * (mu1 - mu0) / (n1 - n0)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def sample_sigmas(
    num_tokens: int, batch: int, generator: torch.Generator, uniform_prob: float = 0.1, eps: float = 1e-3
) -> torch.Tensor:
    """`batch` sigmas in [eps, 1] (float32, CPU) for a modality of `num_tokens` tokens.

    Every call draws the same amount from `generator` whatever `uniform_prob` is, so the random stream, and with it
    a resumed run, does not depend on which draws turned out uniform. Computed in float64, returned as float32.
    """
    mu = shift_mu(num_tokens)
    p_lo = _sigmoid(mu + _STD * _Z_LO)
    p_hi = _sigmoid(mu + _STD * _Z_HI)
    z = torch.randn(batch, generator=generator, dtype=torch.float64)
    uniform = torch.rand(batch, generator=generator, dtype=torch.float64)
    pick_uniform = torch.rand(batch, generator=generator, dtype=torch.float64) < uniform_prob

    s = (torch.sigmoid(mu + _STD * z) - p_lo) / (p_hi - p_lo)
    # Reflect the tails that the stretch pushed outside the range back in, instead of piling them up on the edges.
    s = torch.where(s < eps, 2 * eps - s, s)
    s = torch.where(s > 1, 2 - s, s)
    # U(eps, 1) exactly (an affine map of U(0, 1)), so uniform draws put no point mass on eps.
    s = torch.where(pick_uniform, eps + (1 - eps) * uniform, s)
    return s.float().clamp(eps, 1.0)


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] in `like`'s dtype, to scale each sample of `like` by its own sigma."""
    return sigma.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) * x0 + sigma * noise, with one sigma per batch element."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d sigma: what the transformer is trained to predict."""
    return noise - x0


def masked_mse(pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the tokens with mask 1 (all their channels), pooled over the batch, in float32.

    pred/target [B, N, C], loss_mask [B, N]. Tokens with mask 0 (conditioning) add nothing and get no gradient. An
    all-zero mask gives 0 rather than NaN, still attached to `pred`; the denominator is clamped instead of tested so
    that no GPU synchronisation happens.
    """
    mask = loss_mask.float().unsqueeze(-1)
    squared = (pred.float() - target.float()).square() * mask
    return squared.sum() / (mask.sum() * pred.shape[-1]).clamp_min(1.0)
