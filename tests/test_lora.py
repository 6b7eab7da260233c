"""LoRA injection: which modules each preset adapts, what is trainable, and the adapter state round trip."""

import pytest
import torch

from trainer.lora import (
    PRESET_GROUPS,
    get_lora_state_dict,
    inject_lora,
    lora_parameters,
    matching_modules,
    set_lora_state_dict,
)
from trainer.models.registry import TARGETS, build_random_transformer

BLOCKS = range(2)  # the tiny targets have two blocks
PROJ = ("to_q", "to_k", "to_v", "to_out.0")


def _attn(*names):
    return {f"transformer_blocks.{b}.{n}.{p}" for b in BLOCKS for n in names for p in PROJ}


def _ff(*names):
    return {f"transformer_blocks.{b}.{n}.{p}" for b in BLOCKS for n in names for p in ("net.0.proj", "net.2")}


EXPECTED = {
    "video": _attn("attn1", "attn2") | _ff("ff"),
    "audio": _attn("audio_attn1", "audio_attn2") | _ff("audio_ff"),
    "audio-video": _attn("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
    | _ff("ff", "audio_ff"),
    "ic-lora": _attn("attn1", "attn2") | _ff("ff"),
    "audio-to-video": _attn("attn1", "attn2", "audio_to_video_attn") | _ff("ff"),
    "video-to-audio": _attn("audio_attn1", "audio_attn2", "video_to_audio_attn") | _ff("audio_ff"),
}


@pytest.mark.parametrize("preset", sorted(PRESET_GROUPS))
def test_preset_adapts_exactly_its_modules(tiny_target, preset):
    model = build_random_transformer(tiny_target, seed=0)
    assert set(matching_modules(model, preset)) == EXPECTED[preset]


def test_suffix_list_matches_whole_name_components(tiny_model):
    # "ff.net.2" must not hit "audio_ff.net.2"; "to_q" hits the to_q of all six attentions.
    assert set(matching_modules(tiny_model, ["ff.net.2"])) == {f"transformer_blocks.{b}.ff.net.2" for b in BLOCKS}
    assert len(matching_modules(tiny_model, ["to_q"])) == 6 * len(BLOCKS)


def test_injection_freezes_base_and_keeps_lora_fp32_on_bf16_base():
    model = build_random_transformer(TARGETS["tiny-ltx-2.3"], seed=0, dtype=torch.bfloat16)
    modules = inject_lora(model, rank=4, alpha=8, dropout=0.0, targets="video")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}.default.weight" for m in modules for ab in "AB"}
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base)


def test_fresh_adapter_leaves_outputs_unchanged_and_state_round_trips(tiny_model):
    linear = tiny_model.transformer_blocks[0].attn1.to_q
    x = torch.randn(3, linear.in_features)
    before = linear(x)
    inject_lora(tiny_model, rank=4, alpha=4, dropout=0.0, targets="video")
    torch.testing.assert_close(tiny_model.transformer_blocks[0].attn1.to_q(x), before)  # lora_B starts at zero

    state = get_lora_state_dict(tiny_model)
    assert set(state) == {f"{m}.lora_{ab}.weight" for m in EXPECTED["video"] for ab in "AB"}
    changed = {k: torch.randn_like(v) for k, v in state.items()}
    set_lora_state_dict(tiny_model, changed)
    for key, value in get_lora_state_dict(tiny_model).items():
        assert torch.equal(value, changed[key])


def test_state_that_does_not_fit_is_refused(tiny_model):
    inject_lora(tiny_model, rank=4, alpha=4, dropout=0.0, targets="video")
    state = get_lora_state_dict(tiny_model)
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="missing"):
        set_lora_state_dict(tiny_model, state)


def test_targets_that_match_nothing_are_refused(tiny_model):
    with pytest.raises(ValueError, match="match no Linear layer"):
        inject_lora(tiny_model, rank=4, alpha=4, dropout=0.0, targets=["no_such_layer"])
