"""The token layout of each training mode: which tokens are generated, their sigmas, targets and loss masks.

A batch from the latent cache becomes the keyword arguments of `LTX2VideoTransformer3DModel.forward` plus the
velocity targets and loss masks of each modality. Each generated modality draws its own sigma from its own token
count; the transformer's audio-video gates receive the other modality's sigma (`use_cross_timestep=True`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer import flow

# Timesteps and sigmas enter the transformer scaled by 1000 (its `timestep_scale_multiplier`).
TIMESTEP_SCALE = 1000.0


@dataclass
class StepInputs:
    """Everything one forward pass and its loss need."""

    model_kwargs: dict[str, Any]
    video_target: torch.Tensor
    video_loss_mask: torch.Tensor
    audio_target: torch.Tensor | None
    audio_loss_mask: torch.Tensor | None
    video_sigma: torch.Tensor
    audio_sigma: torch.Tensor | None


def patchify_video(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, F*H*W, C], the transformer's token order (frame, row, column)."""
    return latents.flatten(2).transpose(1, 2)


def patchify_audio(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, T, M] -> [B, T, C*M]: one token per latent time step, channels outermost."""
    return latents.permute(0, 2, 1, 3).flatten(2)


def _noised(x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws a sigma per sample from the token count, returns (x_t, velocity target, sigma)."""
    batch, tokens, _ = x0.shape
    sigma = flow.sample_sigmas(tokens, batch, generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    return flow.add_noise(x0, noise, sigma), flow.velocity_target(x0, noise), sigma


def build_step_inputs(batch: dict[str, Any], mode: str, generator: torch.Generator) -> StepInputs:
    """Noises the generated modalities of `batch` for `mode` ("text-to-video" or "text-to-audio-video")."""
    video_latents = batch["video_latents"]
    b, _, frames, height, width = video_latents.shape
    device = video_latents.device
    video_x0 = patchify_video(video_latents)
    video_xt, video_target, video_sigma = _noised(video_x0, generator)
    video_mask = batch.get("video_loss_mask")
    video_mask = video_mask.flatten(1) if video_mask is not None else torch.ones(video_x0.shape[:2], device=device)

    if mode == "text-to-audio-video":
        audio_x0 = patchify_audio(batch["audio_latents"])
        audio_xt, audio_target, audio_sigma = _noised(audio_x0, generator)
        audio_mask = torch.ones(audio_x0.shape[:2], device=device)
        isolate = False
    elif mode == "text-to-video":
        # The audio stream is cut off from the video (isolate_modalities), so one silent clean token suffices.
        audio_xt = torch.zeros(b, 1, video_x0.shape[-1], device=device, dtype=video_x0.dtype)
        audio_target = audio_mask = None
        audio_sigma = None
        isolate = True
    else:
        raise ValueError(f"unknown training mode {mode!r}")

    audio_sigma_in = audio_sigma if audio_sigma is not None else torch.zeros(b, device=device)
    fps = batch["fps"]
    model_kwargs = {
        "hidden_states": video_xt,
        "audio_hidden_states": audio_xt,
        "encoder_hidden_states": batch["video_text_embeds"],
        "audio_encoder_hidden_states": batch["audio_text_embeds"],
        "encoder_attention_mask": batch["text_mask"],
        "audio_encoder_attention_mask": batch["text_mask"],
        # Per-token timesteps: every token of a generated modality carries that sample's sigma.
        "timestep": (video_sigma * TIMESTEP_SCALE)[:, None].expand(b, video_xt.shape[1]),
        "audio_timestep": (audio_sigma_in * TIMESTEP_SCALE)[:, None].expand(b, audio_xt.shape[1]),
        "sigma": video_sigma * TIMESTEP_SCALE,
        "audio_sigma": audio_sigma_in * TIMESTEP_SCALE,
        "num_frames": frames,
        "height": height,
        "width": width,
        "fps": fps,
        "audio_num_frames": audio_xt.shape[1],
        "isolate_modalities": isolate,
        "use_cross_timestep": True,
        "return_dict": False,
    }
    return StepInputs(
        model_kwargs=model_kwargs,
        video_target=video_target,
        video_loss_mask=video_mask,
        audio_target=audio_target,
        audio_loss_mask=audio_mask,
        video_sigma=video_sigma,
        audio_sigma=audio_sigma,
    )


def compute_loss(model: torch.nn.Module, inputs: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked flow-matching MSE of each generated modality, summed (video loss + audio loss).

    The parts come back as detached tensors so that logging decides when to synchronise with the GPU."""
    video_pred, audio_pred = model(**inputs.model_kwargs)
    video_loss = flow.masked_mse(video_pred, inputs.video_target, inputs.video_loss_mask)
    parts = {"video_loss": video_loss.detach()}
    loss = video_loss
    if inputs.audio_target is not None:
        audio_loss = flow.masked_mse(audio_pred, inputs.audio_target, inputs.audio_loss_mask)
        parts["audio_loss"] = audio_loss.detach()
        loss = loss + audio_loss
    return loss, parts
