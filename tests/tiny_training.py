"""One LoRA training step of the tiny LTX-2.3 model, for the tests that compare a speed or memory switch with the
plain model: the same seeded model, batch and noise every time."""

import torch

from trainer.lora import inject_lora, lora_parameters
from trainer.models.registry import TARGETS, build_random_transformer
from trainer.modes import build_step_inputs, compute_loss

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]


def lora_model():
    """Rank-4 LoRA with a non-zero B, so that every adapter gets a gradient."""
    model = build_random_transformer(TARGETS["tiny-ltx-2.3"], seed=0)
    inject_lora(model, 4, 4.0, 0.0, LORA_TARGETS)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def step_inputs(batch_size: int = 2):
    """Text-to-audio-video inputs with a sigma per modality (seeded)."""
    target, g = TARGETS["tiny-ltx-2.3"], torch.Generator().manual_seed(0)
    batch = {
        "video_latents": torch.randn(batch_size, 128, 3, 2, 3, generator=g),
        "audio_latents": torch.randn(batch_size, 8, 5, 16, generator=g),
        "video_text_embeds": torch.randn(batch_size, 6, target.video_text_dim, generator=g),
        "audio_text_embeds": torch.randn(batch_size, 6, target.audio_text_dim, generator=g),
        "text_mask": torch.ones(batch_size, 6, dtype=torch.long),
        "fps": 24.0,
    }
    return build_step_inputs(batch, "text-to-audio-video", torch.Generator().manual_seed(1))


def train_step(model):
    """Forward and backward: the loss and every LoRA gradient."""
    loss, _ = compute_loss(model, step_inputs())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in lora_parameters(model)]
