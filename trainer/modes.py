"""The token layout of each training mode: which tokens are generated, their sigmas, targets and loss masks.

A batch from the latent cache becomes the keyword arguments of `LTX2VideoTransformer3DModel.forward` plus the
velocity targets and loss masks of each modality. Every mode gives each stream one role:
  generated  noised with its own sigma, drawn from its own token count; carries loss
  clean      the real latents at sigma 0 (timestep 0), a condition; no loss
  absent     one silent token and both audio-video cross attentions off (`isolate_modalities`), so the other stream
             cannot see it
The transformer's audio-video gates receive the other stream's sigma (`use_cross_timestep=True`), 0 for a clean one.
A stream whose tokens all share one timestep passes it once per sample ([B, 1]): the model then builds its AdaLN
tables once per sample instead of once per token, which is the same arithmetic with a tenth of a block's activation
memory fewer to keep (the per-token tables) and fewer passes over memory.
Image-to-video (and IC-LoRA) also keep the first latent frame clean (timestep 0, no loss) with probability
`first_frame_p`. IC-LoRA puts the clean tokens of a reference video (the condition, e.g. a depth or pose video) before
the generated ones, at timestep 0 and without loss, at the RoPE positions of the target region they describe: the
reference grid's own positions with height and width times `reference_downscale` and time times
`reference_temporal_scale`, as the official recipe and its inference pipelines place them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer import flow

# Timesteps and sigmas enter the transformer scaled by 1000 (its `timestep_scale_multiplier`).
TIMESTEP_SCALE = 1000.0
# Pixels per latent cell along (time, height, width): the video VAE's compression, which RoPE positions are in.
VIDEO_SCALE_FACTORS = (8, 32, 32)


@dataclass(frozen=True)
class ModeSpec:
    video: str  # "generated" | "clean" | "absent"
    audio: str
    first_frame: bool = False  # image-to-video conditioning
    reference: bool = False  # IC-LoRA: clean reference video tokens before the generated ones


MODE_SPECS: dict[str, ModeSpec] = {
    "text-to-video": ModeSpec(video="generated", audio="absent"),
    "text-to-audio-video": ModeSpec(video="generated", audio="generated"),
    "image-to-video": ModeSpec(video="generated", audio="absent", first_frame=True),
    "ic-lora": ModeSpec(video="generated", audio="absent", first_frame=True, reference=True),
    "audio-to-video": ModeSpec(video="generated", audio="clean"),
    "video-to-audio": ModeSpec(video="clean", audio="generated"),
    "audio-only": ModeSpec(video="absent", audio="generated"),
}


def isolated_groups(mode: str) -> set[str]:
    """Block sub-modules (trainer/lora.py's groups) that take no part in the loss: an absent stream's, and both
    cross attentions, which isolation switches off."""
    spec = MODE_SPECS[mode]
    cross = {"audio_to_video_attn", "video_to_audio_attn"}
    if spec.audio == "absent":
        return {"audio_attn1", "audio_attn2", "audio_ff"} | cross
    if spec.video == "absent":
        return {"attn1", "attn2", "ff"} | cross
    return set()


@dataclass
class StepInputs:
    """Everything one forward pass and its loss need; targets are None for streams that carry no loss."""

    model_kwargs: dict[str, Any]
    video_target: torch.Tensor | None
    video_loss_mask: torch.Tensor | None
    audio_target: torch.Tensor | None
    audio_loss_mask: torch.Tensor | None
    video_sigma: torch.Tensor
    audio_sigma: torch.Tensor
    # IC-LoRA: the leading video tokens that are the reference; the prediction for them carries no loss.
    reference_tokens: int = 0


def patchify_video(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B, F*H*W, C], the transformer's token order (frame, row, column)."""
    return latents.flatten(2).transpose(1, 2)


def patchify_audio(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, T, M] -> [B, T, C*M]: one token per latent time step, channels outermost."""
    return latents.permute(0, 2, 1, 3).flatten(2)


def video_coords(batch: int, frames: int, height: int, width: int, fps: float,
                 device: torch.device) -> torch.Tensor:
    """RoPE bounds [B, 3, F*H*W, 2] of each video token, [start, end) per axis: time in seconds, height and width in
    pixels. The first latent frame holds one pixel frame (the VAE is causal), so latent frame k covers pixel frames
    [8k - 7, 8k + 1), clamped at 0. The transformer computes the same when it is not given coordinates."""
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=device)
                                        for n in (frames, height, width)), indexing="ij")).flatten(1)  # [3, N]
    scale = torch.tensor(VIDEO_SCALE_FACTORS, dtype=torch.float32, device=device)[:, None, None]
    pixels = torch.stack([grid, grid + 1], dim=-1) * scale  # [3, N, 2]
    pixels[0] = (pixels[0] + 1 - VIDEO_SCALE_FACTORS[0]).clamp(min=0) / fps
    return pixels.unsqueeze(0).expand(batch, -1, -1, -1)


def reference_coords(batch: int, frames: int, height: int, width: int, fps: float, downscale: int,
                     temporal_scale: int, device: torch.device) -> torch.Tensor:
    """An IC-LoRA reference's RoPE bounds: its own grid's, stretched onto the target's. A reference taken at 1/d of
    the size and every k-th frame sits where the target region it describes is (height and width times d, time
    times k)."""
    coords = video_coords(batch, frames, height, width, fps, device).clone()
    coords[:, 0] *= temporal_scale
    coords[:, 1:] *= downscale
    return coords


@dataclass
class _Stream:
    """One modality's tokens for the forward pass and its loss."""

    xt: torch.Tensor
    timestep: torch.Tensor  # unscaled sigma: [B, 1] while all tokens share it, else per token [B, N]
    sigma: torch.Tensor  # per sample, unscaled
    target: torch.Tensor | None
    loss_mask: torch.Tensor | None


def _stream(role: str, x0: torch.Tensor | None, batch: int, width: int, loss_mask: torch.Tensor | None,
            generator: torch.Generator, device: torch.device) -> _Stream:
    if role == "absent":
        zeros = torch.zeros(batch, device=device)
        return _Stream(torch.zeros(batch, 1, width, device=device), zeros[:, None], zeros, None, None)
    tokens = x0.shape[1]
    if role == "clean":
        zeros = torch.zeros(batch, device=device)
        return _Stream(x0, zeros[:, None], zeros, None, None)
    sigma = flow.sample_sigmas(tokens, batch, generator).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
    mask = loss_mask if loss_mask is not None else torch.ones(batch, tokens, device=device)
    return _Stream(flow.add_noise(x0, noise, sigma), sigma[:, None], sigma, flow.velocity_target(x0, noise), mask)


def _keep_first_frame_clean(video: _Stream, x0: torch.Tensor, frame_tokens: int, probability: float,
                            generator: torch.Generator) -> None:
    """Image-to-video: per sample, with `probability`, latent frame 0 becomes a clean condition (sigma 0, no loss)."""
    chosen = torch.rand(x0.shape[0], generator=generator) < probability  # on the CPU: no GPU sync to test it
    if not chosen.any():
        return
    first = torch.zeros(x0.shape[1], dtype=torch.bool, device=x0.device)
    first[:frame_tokens] = True
    condition = chosen.to(x0.device)[:, None] & first[None, :]  # [B, N]
    video.xt = torch.where(condition[..., None], x0, video.xt)
    video.timestep = video.timestep.expand(condition.shape).masked_fill(condition, 0.0)
    video.loss_mask = video.loss_mask.masked_fill(condition, 0.0)


def build_step_inputs(batch: dict[str, Any], mode: str, generator: torch.Generator,
                      first_frame_p: float = 0.0) -> StepInputs:
    """The forward-pass inputs and loss targets of `batch` in `mode` (see MODE_SPECS)."""
    if mode not in MODE_SPECS:
        raise ValueError(f"unknown training mode {mode!r}; modes: {', '.join(MODE_SPECS)}")
    spec = MODE_SPECS[mode]
    video_latents = batch["video_latents"]
    b, channels, frames, height, width = video_latents.shape
    device = video_latents.device
    video_x0 = patchify_video(video_latents)
    video_mask = batch.get("video_loss_mask")
    video = _stream(spec.video, video_x0, b, channels, video_mask.flatten(1) if video_mask is not None else None,
                    generator, device)
    audio_x0 = patchify_audio(batch["audio_latents"]) if spec.audio != "absent" else None
    audio = _stream(spec.audio, audio_x0, b, channels, None, generator, device)
    # Only frames after the first can carry loss: a single-frame sample (an image) is never conditioned away.
    if spec.first_frame and frames > 1:
        _keep_first_frame_clean(video, video_x0, height * width, first_frame_p, generator)
    if spec.video == "absent":
        frames = height = width = 1

    reference_tokens = 0
    video_hidden, video_timestep, coords = video.xt, video.timestep, None
    if spec.reference:
        if batch.get("reference_latents") is None:
            raise ValueError(f"mode {mode!r} needs reference_latents in every batch: preprocess samples with a "
                             f"reference video")
        reference = batch["reference_latents"]
        ref_x0 = patchify_video(reference).to(video.xt.dtype)
        reference_tokens = ref_x0.shape[1]
        video_hidden = torch.cat([ref_x0, video.xt], dim=1)
        video_timestep = torch.cat([torch.zeros(b, reference_tokens, device=device),
                                    video.timestep.expand(b, video.xt.shape[1])], dim=1)
        coords = torch.cat([
            reference_coords(b, *reference.shape[2:], batch["fps"], batch["reference_downscale"],
                             batch["reference_temporal_scale"], device),
            video_coords(b, frames, height, width, batch["fps"], device),
        ], dim=2)

    model_kwargs = {
        "hidden_states": video_hidden,
        "audio_hidden_states": audio.xt,
        "encoder_hidden_states": batch["video_text_embeds"],
        "audio_encoder_hidden_states": batch["audio_text_embeds"],
        "encoder_attention_mask": batch["text_mask"],
        "audio_encoder_attention_mask": batch["text_mask"],
        "timestep": video_timestep * TIMESTEP_SCALE,
        "audio_timestep": audio.timestep * TIMESTEP_SCALE,
        "sigma": video.sigma * TIMESTEP_SCALE,
        "audio_sigma": audio.sigma * TIMESTEP_SCALE,
        "num_frames": frames,
        "height": height,
        "width": width,
        "fps": batch["fps"],
        "audio_num_frames": audio.xt.shape[1],
        "video_coords": coords,
        "isolate_modalities": "absent" in (spec.video, spec.audio),
        "use_cross_timestep": True,
        "return_dict": False,
    }
    return StepInputs(model_kwargs, video.target, video.loss_mask, audio.target, audio.loss_mask, video.sigma,
                      audio.sigma, reference_tokens)


def compute_loss(model: torch.nn.Module, inputs: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked flow-matching MSE of each generated modality, summed (video loss + audio loss).

    The parts come back as detached tensors so that logging decides when to synchronise with the GPU."""
    video_pred, audio_pred = model(**inputs.model_kwargs)
    losses = {}
    if inputs.video_target is not None:
        generated = video_pred[:, inputs.reference_tokens:]
        losses["video_loss"] = flow.masked_mse(generated, inputs.video_target, inputs.video_loss_mask)
    if inputs.audio_target is not None:
        losses["audio_loss"] = flow.masked_mse(audio_pred, inputs.audio_target, inputs.audio_loss_mask)
    return sum(losses.values()), {name: value.detach() for name, value in losses.items()}
