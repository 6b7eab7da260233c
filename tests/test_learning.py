"""A LoRA must learn: a teacher (tiny base + a planted low-rank delta) makes the targets, and training a LoRA on the
base with the project's own step inputs and optimizer recovers most of the teacher's behaviour."""

import pytest
import torch

from trainer.config import resolve
from trainer.fp8 import use_fp8_base_linears
from trainer.lora import inject_lora, lora_parameters, matching_modules
from trainer.models.registry import TARGETS, build_random_transformer
from trainer.modes import build_step_inputs
from trainer.train import build_optimizer

TARGET = TARGETS["tiny-ltx-2.3"]


def _batch(generator, batch=2):
    """Random latents and text (not zeros) in the cache's layout."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return {
        "video_latents": randn(batch, 128, 2, 2, 3),
        "audio_latents": randn(batch, 8, 5, 16),
        "video_text_embeds": randn(batch, 6, TARGET.video_text_dim),
        "audio_text_embeds": randn(batch, 6, TARGET.audio_text_dim),
        "text_mask": torch.ones(batch, 6, dtype=torch.long),
        "fps": 24.0,
    }


def _inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    return build_step_inputs(_batch(generator), "text-to-audio-video", generator).model_kwargs


def _gap(model, teacher, seeds):
    """Mean squared difference between model and teacher outputs (video and audio) over held-out inputs."""
    total = 0.0
    with torch.no_grad():
        for seed in seeds:
            kwargs = _inputs(seed)
            for out, ref in zip(model(**kwargs), teacher(**kwargs)):
                total += torch.mean((out - ref) ** 2).item()
    return total / len(seeds)


@pytest.mark.parametrize("fp8", [False, True], ids=["full-precision", "fp8-base"])
def test_lora_recovers_a_planted_low_rank_delta(fp8):
    teacher = build_random_transformer(TARGET, seed=0)
    student = build_random_transformer(TARGET, seed=0)
    planted = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in matching_modules(teacher, "audio-video"):
            weight = teacher.get_submodule(name).weight
            u = torch.randn(weight.shape[0], 2, generator=planted)
            v = torch.randn(2, weight.shape[1], generator=planted)
            weight += 0.5 * (u @ v) / weight.shape[1] ** 0.5
    teacher.requires_grad_(False)

    held_out = range(1000, 1008)
    gap_before = _gap(student, teacher, held_out)
    assert gap_before > 1e-2  # the planted delta really changes the outputs

    torch.manual_seed(0)
    inject_lora(student, rank=4, alpha=4, dropout=0.0, targets="audio-video")
    if fp8:  # converges as well as in full precision: the same bound (train.fp8)
        use_fp8_base_linears(student)
    cfg = resolve({"output_dir": "unused", "model": {"target": TARGET.name}, "data": {"cache_dir": "unused"},
                   "optim": {"learning_rate": 5e-3, "weight_decay": 0.0}})
    optimizer = build_optimizer(lora_parameters(student), cfg, torch.device("cpu"))
    for step in range(400):
        kwargs = _inputs(step)
        with torch.no_grad():
            targets = teacher(**kwargs)
        loss = sum(torch.mean((out - ref) ** 2) for out, ref in zip(student(**kwargs), targets))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    # "Most of the teacher's behaviour": the held-out output gap shrinks below 20% of what it was.
    gap_after = _gap(student, teacher, held_out)
    assert gap_after < 0.2 * gap_before, (gap_before, gap_after)
