"""A synthetic latent cache with learnable structure, for the smoke run and the tests.

Each sample mixes two smooth waves shared by the whole dataset, a standing one and one that travels across the
latent grid over frames, with per-sample mixing coefficients and a per-sample speed of travel. The text embeddings
encode the coefficients and the speed, and the audio is what the waves show at one fixed point of the grid, sampled
at the audio rate (the soundtrack follows the motion). So the data lies on a low-dimensional set that a LoRA on a
random tiny transformer visibly learns within a hundred steps, and caption and audio carry real information.
Every sample also has an IC-LoRA reference at full size: the travelling wave alone, through its own channel loading
(a control video showing where the pattern is in each frame).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from trainer.data.cache import (
    AUDIO_CHANNELS,
    AUDIO_MEL_BINS,
    AUDIO_STEPS_PER_SECOND,
    MANIFEST,
    write_manifest,
    write_sample,
)
from trainer.models.registry import ModelTarget

# A standing wave (constant over the grid: the clip's overall tone) and a travelling one. Measured on tiny-ltx-2.3
# with a rank-16 LoRA: with these two the loss falls well below what pure-noise latents allow (~2.08) within 200
# steps; four or eight waves carry the same structure but take several times longer to show it.
NUM_WAVES = 2
# A latent frame spans 8 frames.
FRAMES_PER_LATENT_FRAME = 8


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


def _waves(freq_y: torch.Tensor, freq_x: torch.Tensor, phase: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
           height: int, width: int) -> torch.Tensor:
    """cos(2 pi (fy y / H + fx x / W) + phase) per wave: [K, *broadcast(y, x).shape]."""
    shape = (-1,) + (1,) * max(y.dim(), x.dim())
    angle = freq_y.view(shape) * y / height + freq_x.view(shape) * x / width
    return torch.cos(2 * math.pi * angle + phase.view(shape))


def write_synthetic_cache(
    cache_dir: str | Path,
    target: ModelTarget,
    num_samples: int = 8,
    latent_frames: int = 3,
    latent_height: int = 4,
    latent_width: int = 6,
    audio_tokens: int | None = 13,
    text_len: int = 16,
    fps: float = 24.0,
    seed: int = 0,
) -> Path:
    """Writes `num_samples` samples and the manifest into `cache_dir`, a pure function of the arguments.

    `audio_tokens=None` writes no audio. Returns the manifest's path.
    """
    g = torch.Generator().manual_seed(seed)
    k, channels = NUM_WAVES, target.video_channels
    audio_width = AUDIO_CHANNELS * AUDIO_MEL_BINS
    # Shared by every sample: the waves, how they load onto latent channels, and how captions encode a sample.
    # Wave 0 has frequency 0 (flat, so its travel shows nothing); wave 1 has 0-2 cycles down, 1-3 across the grid.
    freq_y = torch.tensor([0.0, float(torch.randint(0, 3, (1,), generator=g))], dtype=torch.float64)
    freq_x = torch.tensor([0.0, float(torch.randint(1, 4, (1,), generator=g))], dtype=torch.float64)
    phase = torch.tensor([0.0, 2 * math.pi * float(torch.rand(1, generator=g))], dtype=torch.float64)
    video_loading = torch.randn(k, channels, generator=g, dtype=torch.float64)
    audio_loading = torch.randn(k, audio_width, generator=g, dtype=torch.float64)
    reference_loading = torch.randn(channels, generator=g, dtype=torch.float64)
    video_text_proj = torch.randn(k + 1, text_len, target.video_text_dim, generator=g, dtype=torch.float64)
    audio_text_proj = torch.randn(k + 1, text_len, target.audio_text_dim, generator=g, dtype=torch.float64)

    y = torch.arange(latent_height, dtype=torch.float64).view(1, -1, 1)
    x = torch.arange(latent_width, dtype=torch.float64).view(1, 1, -1)
    frames = torch.arange(latent_frames, dtype=torch.float64).view(-1, 1, 1)
    cache_dir = Path(cache_dir)
    for i in range(num_samples):
        coefficients = torch.randn(k, generator=g, dtype=torch.float64)
        # Latent columns moved per latent frame, rounded so that the caption states it exactly.
        speed = round(0.25 + 1.25 * torch.rand(1, generator=g).item(), 2)
        real_tokens = int(torch.randint(text_len // 2 + 1, text_len + 1, (1,), generator=g))

        waves = _waves(freq_y, freq_x, phase, y, x - speed * frames, latent_height, latent_width)  # [K, F, H, W]
        video = torch.einsum("k,kc,kfhw->cfhw", coefficients, video_loading, waves)

        code = torch.cat([coefficients, torch.tensor([speed], dtype=torch.float64)])
        text_mask = (torch.arange(text_len) < real_tokens).long()
        video_text = torch.einsum("k,kld->ld", code, video_text_proj) * text_mask[:, None]
        audio_text = torch.einsum("k,kld->ld", code, audio_text_proj) * text_mask[:, None]
        tensors = {
            "video_latents": _normalised(video).float(),
            "video_text_embeds": (video_text / video_text[:real_tokens].std()).float(),
            "audio_text_embeds": (audio_text / audio_text[:real_tokens].std()).float(),
            "text_mask": text_mask,
            "reference_latents": _normalised(torch.einsum("c,fhw->cfhw", reference_loading, waves[1])).float(),
        }
        if audio_tokens is not None:
            # The waves at latent position (0, 0) as they move past it, at the audio rate.
            seconds = torch.arange(audio_tokens, dtype=torch.float64) / AUDIO_STEPS_PER_SECOND
            shift = speed * seconds * fps / FRAMES_PER_LATENT_FRAME
            heard = _waves(freq_y, freq_x, phase, torch.zeros(1), -shift, latent_height, latent_width)  # [K, T]
            audio = torch.einsum("k,kw,kt->tw", coefficients, audio_loading, heard)
            audio = audio.view(audio_tokens, AUDIO_CHANNELS, AUDIO_MEL_BINS).permute(1, 0, 2)
            tensors["audio_latents"] = _normalised(audio).float().contiguous()
        write_sample(cache_dir, f"sample_{i:03d}", tensors, {
            "model_version": target.version,
            "fps": fps,
            "caption": f"synthetic sample {i}: pattern speed {speed:g}",
            "num_frames": (latent_frames - 1) * FRAMES_PER_LATENT_FRAME + 1,
            "height": latent_height * 32,
            "width": latent_width * 32,
            "reference_downscale": 1,
            "reference_temporal_scale": 1,
        })
    return write_manifest(cache_dir, target.version)


def ensure_synthetic_cache(cache_dir: str | Path, target: ModelTarget, **kwargs) -> Path:
    """Generates the synthetic cache unless `cache_dir` already has a manifest (which is then left as it is)."""
    manifest = Path(cache_dir) / MANIFEST
    if manifest.is_file():
        return manifest
    return write_synthetic_cache(cache_dir, target, **kwargs)
