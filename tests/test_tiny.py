"""Tiny components: seeded and reproducible, with the production shapes at every interface the preprocessing uses."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_gemma import write_tiny_gemma

from trainer.models.registry import TARGETS
from trainer.models.text import PromptEncoder, load_text_encoder
from trainer.models.tiny import (
    GEMMA_HIDDEN_SIZE,
    GEMMA_LAYERS,
    build_tiny_components,
    tiny_audio_vae,
    tiny_connectors,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_video_vae,
)


def _modules(components) -> dict[str, torch.nn.Module]:
    return {f.name: getattr(components, f.name) for f in dataclasses.fields(components) if f.name != "tokenizer"}


def test_same_seed_same_weights_and_the_callers_random_state_is_left_alone(tiny_target):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny_components(tiny_target, seed=0)
    assert torch.equal(torch.rand(3), expected_next)

    second = build_tiny_components(tiny_target, seed=0)
    other = build_tiny_components(tiny_target, seed=1)
    for name, module in _modules(first).items():
        a, b, c = module.state_dict(), getattr(second, name).state_dict(), getattr(other, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), name
        assert not all(torch.equal(a[key], c[key]) for key in a), name


def test_components_are_frozen_fp32_and_in_eval_mode(tiny_target):
    for name, module in _modules(build_tiny_components(tiny_target)).items():
        assert not module.training, name
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in module.parameters()), name


@pytest.mark.parametrize("frames, height, width", [(9, 64, 64), (1, 32, 96), (17, 64, 32)])
def test_video_vae_compresses_32x_in_space_and_8x_in_time_with_a_causal_first_frame(frames, height, width):
    vae = tiny_video_vae(0)
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, frames, height, width) * 2 - 1).latent_dist.mode()
    assert latents.shape == (1, 128, (frames - 1) // 8 + 1, height // 32, width // 32)
    assert torch.isfinite(latents).all()


def test_video_vae_decodes_back_to_pixels_and_has_real_statistics():
    vae = tiny_video_vae(0)
    with torch.no_grad():
        assert vae.decode(torch.randn(1, 128, 2, 2, 2)).sample.shape == (1, 3, 9, 64, 64)
    assert vae.latents_mean.shape == vae.latents_std.shape == (128,)
    assert vae.latents_mean.abs().min() > 0 and (vae.latents_std - 1).abs().max() > 0.1
    assert (vae.latents_std > 0).all()


def test_audio_vae_turns_one_second_of_mel_into_25_latent_steps():
    vae = tiny_audio_vae(0)
    with torch.no_grad():
        latents = vae.encode(torch.randn(1, 2, 100, 64)).latent_dist.mode()  # 1 s at 16 kHz, hop 160
    assert latents.shape == (1, 8, 25, 16)
    # Statistics normalise the packed token features: 8 channels x 16 mel bins = the transformer's audio width.
    assert vae.latents_mean.shape == vae.latents_std.shape == (8 * 16,) == (TARGETS["tiny-ltx-2.3"].audio_channels,)
    assert vae.latents_mean.abs().min() > 0 and (vae.latents_std > 0).all()


def test_tokenizer_has_gemmas_special_ids_left_padding_and_unknown_words():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("A red ball, zebra").input_ids
    special = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id)
    assert special == (0, 1, 2, 3)
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "a", "red", "ball", ",", "<unk>"]
    assert tokenizer.padding_side == "left"
    assert tiny_tokenizer(add_bos_token=False)("a red ball").input_ids == ids[1:4]


@pytest.mark.parametrize("target_name", ["tiny-ltx-2.3", "tiny-ltx-2"])
def test_prompt_encoder_accepts_the_tiny_parts(target_name):
    target = TARGETS[target_name]
    text_encoder, tokenizer = tiny_text_encoder(0)
    connectors = tiny_connectors(target, text_encoder, 0)
    out = PromptEncoder(tokenizer, text_encoder, connectors, target, max_length=32).encode(["a red ball"])
    assert out["video_text_embeds"].shape == (1, 32, target.video_text_dim)
    assert out["audio_text_embeds"].shape == (1, 32, target.audio_text_dim)
    assert torch.isfinite(out["video_text_embeds"]).all() and torch.isfinite(out["audio_text_embeds"]).all()


def test_connectors_refuse_a_target_they_cannot_serve():
    wide = dataclasses.replace(
        TARGETS["tiny-ltx-2"], transformer_config={**TARGETS["tiny-ltx-2"].transformer_config, "caption_channels": 48}
    )
    with pytest.raises(ValueError, match="width"):
        tiny_connectors(wide, tiny_text_encoder(0)[0])


def test_the_saved_text_encoder_loads_back_as_the_one_in_memory(tmp_path):
    model, tokenizer = tiny_text_encoder(0)
    loaded, loaded_tokenizer = load_text_encoder(
        write_tiny_gemma(tmp_path), expected_hidden_size=GEMMA_HIDDEN_SIZE, expected_layers=GEMMA_LAYERS
    )
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    prompt = "the dog runs in the park and barks at a red ball, 24 times"
    assert loaded_tokenizer(prompt).input_ids == tokenizer(prompt).input_ids
