"""Token layout of every training mode: what is generated, what is a clean condition, what carries loss."""

import pytest
import torch

from trainer.lora import inject_lora, lora_parameters
from trainer.models.registry import TARGETS, build_random_transformer
from trainer.modes import (
    MODE_SPECS,
    TIMESTEP_SCALE,
    build_step_inputs,
    compute_loss,
    patchify_audio,
    patchify_video,
    video_coords,
)

FRAMES, HEIGHT, WIDTH, AUDIO_STEPS = 3, 2, 3, 5


def _batch(target, seed=0, batch=2, shape=(FRAMES, HEIGHT, WIDTH), reference=(FRAMES, HEIGHT, WIDTH), factors=(1, 1)):
    g = torch.Generator().manual_seed(seed)
    return {
        "video_latents": torch.randn(batch, 128, *shape, generator=g),
        "audio_latents": torch.randn(batch, 8, AUDIO_STEPS, 16, generator=g),
        "video_text_embeds": torch.randn(batch, 6, target.video_text_dim, generator=g),
        "audio_text_embeds": torch.randn(batch, 6, target.audio_text_dim, generator=g),
        "text_mask": torch.ones(batch, 6, dtype=torch.long),
        "reference_latents": torch.randn(batch, 128, *reference, generator=g),
        "reference_downscale": factors[0],
        "reference_temporal_scale": factors[1],
        "fps": 24.0,
    }


def _inputs(mode, batch, first_frame_p=0.0, seed=1):
    return build_step_inputs(batch, mode, torch.Generator().manual_seed(seed), first_frame_p)


@pytest.mark.parametrize("mode", sorted(MODE_SPECS))
def test_roles_give_the_right_tokens_timesteps_and_losses(mode):
    spec = MODE_SPECS[mode]
    batch = _batch(TARGETS["tiny-ltx-2.3"])
    inputs = _inputs(mode, batch)
    kw = inputs.model_kwargs
    generated = slice(inputs.reference_tokens, None)  # IC-LoRA's reference tokens come first (tested below)
    streams = {
        "video": (spec.video, kw["hidden_states"][:, generated], kw["timestep"][:, generated], kw["sigma"],
                  inputs.video_target,
                  patchify_video(batch["video_latents"])),
        "audio": (spec.audio, kw["audio_hidden_states"], kw["audio_timestep"], kw["audio_sigma"], inputs.audio_target,
                  patchify_audio(batch["audio_latents"])),
    }
    for name, (role, xt, timestep, sigma, target, x0) in streams.items():
        if role == "absent":
            assert xt.shape == (2, 1, 128) and not xt.any() and target is None, name
        elif role == "clean":
            assert torch.equal(xt, x0) and not timestep.any() and not sigma.any() and target is None, name
        else:  # generated: every token carries its sample's sigma (given once per sample unless IC-LoRA), and the loss
            assert timestep.shape == (x0.shape[0], x0.shape[1] if spec.reference else 1), name
            assert torch.allclose(timestep, sigma[:, None].expand_as(timestep))
            assert ((sigma > 0) & (sigma <= TIMESTEP_SCALE)).all() and target is not None, name
            assert not torch.equal(xt, x0), name
    assert kw["isolate_modalities"] == ("absent" in (spec.video, spec.audio))


def test_each_generated_stream_draws_its_own_sigma():
    inputs = _inputs("text-to-audio-video", _batch(TARGETS["tiny-ltx-2.3"], batch=4))
    assert not torch.equal(inputs.video_sigma, inputs.audio_sigma)


def test_image_to_video_keeps_the_first_latent_frame_clean():
    batch = _batch(TARGETS["tiny-ltx-2.3"])
    x0 = patchify_video(batch["video_latents"])
    first = HEIGHT * WIDTH
    always = _inputs("image-to-video", batch, first_frame_p=1.0)
    kw = always.model_kwargs
    assert torch.equal(kw["hidden_states"][:, :first], x0[:, :first])
    assert not kw["timestep"][:, :first].any() and kw["timestep"][:, first:].all()
    assert not always.video_loss_mask[:, :first].any() and always.video_loss_mask[:, first:].all()
    never = _inputs("image-to-video", batch, first_frame_p=0.0)
    assert never.video_loss_mask.all() and never.model_kwargs["timestep"].all()


@pytest.mark.parametrize("target_name", ["tiny-ltx-2.3", "tiny-ltx-2"])
def test_a_timestep_given_once_per_sample_predicts_as_one_given_per_token(target_name):
    target = TARGETS[target_name]
    model = build_random_transformer(target, seed=0).eval()
    kw = _inputs("text-to-audio-video", _batch(target)).model_kwargs
    assert kw["timestep"].shape == (2, 1) and kw["audio_timestep"].shape == (2, 1)
    per_token = dict(kw, timestep=kw["timestep"].expand(kw["hidden_states"].shape[:2]),
                     audio_timestep=kw["audio_timestep"].expand(kw["audio_hidden_states"].shape[:2]))
    with torch.no_grad():
        once, per = model(**kw), model(**per_token)
    for a, b in zip(once, per):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_image_to_video_never_conditions_away_a_single_frame_sample():
    batch = _batch(TARGETS["tiny-ltx-2.3"])
    batch["video_latents"] = batch["video_latents"][:, :, :1]
    assert _inputs("image-to-video", batch, first_frame_p=1.0).video_loss_mask.all()


def test_isolated_audio_cannot_change_the_video_prediction():
    target = TARGETS["tiny-ltx-2.3"]
    model = build_random_transformer(target, seed=0).eval()
    kw = _inputs("text-to-video", _batch(target)).model_kwargs
    with torch.no_grad():
        video, _ = model(**kw)
        other = dict(kw, audio_hidden_states=torch.randn_like(kw["audio_hidden_states"]) * 5)
        video_other, _ = model(**other)
        joint = dict(other, isolate_modalities=False)
        video_joint, _ = model(**joint)
    torch.testing.assert_close(video, video_other, rtol=0, atol=0)
    assert not torch.allclose(video, video_joint)  # without isolation the audio does reach the video


@pytest.mark.parametrize("target_name", ["tiny-ltx-2.3", "tiny-ltx-2"])
@pytest.mark.parametrize("mode", sorted(MODE_SPECS))
def test_one_training_step_gives_finite_lora_gradients(mode, target_name):
    target = TARGETS[target_name]
    model = build_random_transformer(target, seed=0)
    inject_lora(model, rank=2, alpha=2, dropout=0.0, targets="audio-video")
    for p in lora_parameters(model):  # non-zero B so every adapter passes gradient to its A
        torch.nn.init.normal_(p, std=0.02)
    loss, parts = compute_loss(model, _inputs(mode, _batch(target), first_frame_p=0.5))
    loss.backward()
    spec = MODE_SPECS[mode]
    assert set(parts) == {f"{s}_loss" for s, role in (("video", spec.video), ("audio", spec.audio))
                          if role == "generated"}
    grads = [p.grad for p in lora_parameters(model) if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 2, 3), (2, 4, 1)])
@pytest.mark.parametrize("fps", [24.0, 25.0])
def test_video_coords_are_the_transformers_own(shape, fps):
    model = build_random_transformer(TARGETS["tiny-ltx-2.3"], seed=0)
    expected = model.rope.prepare_video_coords(2, *shape, torch.device("cpu"), fps=fps)
    torch.testing.assert_close(video_coords(2, *shape, fps, torch.device("cpu")), expected, rtol=0, atol=0)


def test_ic_lora_prepends_the_clean_reference_at_the_positions_of_the_region_it_shows():
    # Target 3 latent frames x 4 x 6 cells; reference at half size (d = 2) and every other pixel frame (k = 2):
    # 17 pixel frames -> 9 -> 2 latent frames.
    batch = _batch(TARGETS["tiny-ltx-2.3"], shape=(3, 4, 6), reference=(2, 2, 3), factors=(2, 2))
    inputs = _inputs("ic-lora", batch)
    kw = inputs.model_kwargs
    reference = patchify_video(batch["reference_latents"])
    count = reference.shape[1]
    assert inputs.reference_tokens == count == 2 * 2 * 3
    assert torch.equal(kw["hidden_states"][:, :count], reference)
    assert not kw["timestep"][:, :count].any() and kw["timestep"][:, count:].all()
    assert inputs.video_target.shape[1] == kw["hidden_states"].shape[1] - count  # loss on the target only
    coords = kw["video_coords"]
    torch.testing.assert_close(coords[:, :, count:], video_coords(2, 3, 4, 6, 24.0, torch.device("cpu")))
    # Reference cell (frame 1, row 1, column 2) shows pixel rows [64, 128), columns [128, 192) of the target, and
    # pixel frames [2, 18) (its own frames [1, 9) at every other frame), in seconds.
    index = (1 * 2 + 1) * 3 + 2
    torch.testing.assert_close(coords[0, :, index], torch.tensor([[2 / 24, 18 / 24], [64.0, 128.0], [128.0, 192.0]]))
    first = coords[0, :, 0]  # the causal first frame is pixel frame 0 alone, whatever the scale
    torch.testing.assert_close(first, torch.tensor([[0.0, 2 / 24], [0.0, 64.0], [0.0, 64.0]]))


def test_ic_lora_reference_conditions_the_prediction_but_carries_no_loss():
    target = TARGETS["tiny-ltx-2.3"]
    model = build_random_transformer(target, seed=0).eval()
    batch = _batch(target, shape=(3, 4, 6), reference=(2, 2, 3), factors=(2, 2))
    inputs = _inputs("ic-lora", batch)
    with torch.no_grad():
        loss, _ = compute_loss(model, inputs)
        other = _inputs("ic-lora", dict(batch, reference_latents=torch.randn_like(batch["reference_latents"])))
        loss_other, _ = compute_loss(model, other)
    assert not torch.isclose(loss, loss_other)  # the model sees the reference

    class Echo(torch.nn.Module):  # predicts its input: the reference part of the prediction is the reference
        def forward(self, hidden_states, audio_hidden_states, **_):
            return hidden_states, audio_hidden_states

    moved = _inputs("ic-lora", batch)
    moved.model_kwargs["hidden_states"][:, :moved.reference_tokens] += 100.0
    torch.testing.assert_close(compute_loss(Echo(), moved)[0], compute_loss(Echo(), _inputs("ic-lora", batch))[0])


def test_ic_lora_without_references_is_refused():
    batch = _batch(TARGETS["tiny-ltx-2.3"])
    del batch["reference_latents"]
    with pytest.raises(ValueError, match="ic-lora.*reference_latents"):
        _inputs("ic-lora", batch)
