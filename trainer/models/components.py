"""The parts around the transformer that turn media and captions into the latent cache: VAEs and prompt encoder.

Production targets load them from the public weights (`model.components` or `model.checkpoint`, and
`model.text_encoder`); tiny targets without a checkpoint build random tiny ones (trainer/models/tiny.py), so the
smoke run exercises the real preprocessing path with nothing downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from trainer.config import ConfigError, RunConfig
from trainer.io import digest, file_identity
from trainer.models.registry import get_target
from trainer.models.text import PromptEncoder

# Prompt length of the tiny text path (production: 1024 tokens, as the published models).
TINY_TEXT_TOKENS = 32


@dataclass
class Components:
    video_vae: torch.nn.Module
    audio_vae: torch.nn.Module
    prompt_encoder: PromptEncoder


def components_identity(cfg: RunConfig) -> str:
    """A short hash naming the weights that encode the cache, computed without loading them."""
    if cfg.model.checkpoint is None:
        described = {"random": cfg.model.target, "seed": cfg.model.init_seed}
    else:
        described = {
            "components": file_identity(cfg.model.components or cfg.model.checkpoint),
            "text_encoder": file_identity(cfg.model.text_encoder) if cfg.model.text_encoder else None,
        }
    return digest(described)[:16]


def load_components(cfg: RunConfig, device: torch.device) -> Components:
    """VAEs (audio VAE in fp32, as the official recipe runs it) and the prompt encoder, ready on `device`."""
    target = get_target(cfg.model.target)
    if cfg.model.checkpoint is None:
        from trainer.models.tiny import build_tiny_components

        tiny = build_tiny_components(target, seed=cfg.model.init_seed)
        encoder = PromptEncoder(tiny.tokenizer, tiny.text_encoder.to(device), tiny.connectors.to(device), target,
                                max_length=TINY_TEXT_TOKENS)
        return Components(tiny.video_vae.to(device), tiny.audio_vae.to(device), encoder)

    from trainer.models.loading import load_audio_vae, load_connectors, load_video_vae
    from trainer.models.text import load_text_encoder

    if cfg.model.text_encoder is None:
        raise ConfigError("model.text_encoder is required to encode captions: set it to a local Gemma 3 12B folder")
    source = cfg.model.components or cfg.model.checkpoint
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    text_encoder, tokenizer = load_text_encoder(cfg.model.text_encoder, dtype=dtype, device=device)
    encoder = PromptEncoder(tokenizer, text_encoder, load_connectors(source, device, dtype), target)
    return Components(load_video_vae(source, device, dtype), load_audio_vae(source, device, torch.float32), encoder)


@torch.no_grad()
def encode_video(vae: torch.nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> normalised latents [128, F', H', W'] (distribution mode, per-channel statistics)."""
    x = frames.unsqueeze(0).to(vae.device, vae.dtype)
    latents = vae.encode(x).latent_dist.mode().float()
    mean = vae.latents_mean.view(1, -1, 1, 1, 1).float()
    std = vae.latents_std.view(1, -1, 1, 1, 1).float()
    return ((latents - mean) * vae.config.scaling_factor / std)[0].cpu()


@torch.no_grad()
def encode_audio(vae: torch.nn.Module, mel: torch.Tensor) -> torch.Tensor:
    """Log-mel [2, T, 64] -> normalised latents [8, T/4, 16], normalised per packed (channel, bin) feature."""
    latents = vae.encode(mel.unsqueeze(0).to(vae.device, torch.float32)).latent_dist.mode().float()
    _, channels, steps, bins = latents.shape
    packed = latents.permute(0, 2, 1, 3).flatten(2)  # [1, T', C * M], the transformer's audio token layout
    packed = (packed - vae.latents_mean.float()) / vae.latents_std.float()
    return packed.view(1, steps, channels, bins).permute(0, 2, 1, 3)[0].contiguous().cpu()
