"""PEFT LoRA injection into the diffusers LTX-2 transformer: target presets, adapter state in and out.

Module names follow `LTX2VideoTransformer3DModel`: each block has six attentions (`attn1`, `attn2`, `audio_attn1`,
`audio_attn2`, `audio_to_video_attn`, `video_to_audio_attn`, each with `to_q/to_k/to_v/to_out.0`) and two
feed-forwards (`ff`, `audio_ff`, each `net.0.proj` and `net.2`). Presets become anchored regexes over those
names, so a preset never matches more than its sub-modules.
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without torch.distributed: nothing is ever sharded
    DTensor = ()

ADAPTER_NAME = "default"

_BLOCK = r"transformer_blocks\.\d+\."
_PROJECTIONS = {"attention": r"(to_q|to_k|to_v|to_out\.0)", "feed-forward": r"net\.(0\.proj|2)"}

# The eight adaptable sub-modules of every block, by kind.
MODULE_GROUPS: dict[str, str] = {
    "attn1": "attention",  # video self-attention
    "attn2": "attention",  # video text cross-attention
    "audio_attn1": "attention",
    "audio_attn2": "attention",
    "audio_to_video_attn": "attention",  # video queries, audio keys
    "video_to_audio_attn": "attention",
    "ff": "feed-forward",
    "audio_ff": "feed-forward",
}
_VIDEO = ("attn1", "attn2", "ff")
_AUDIO = ("audio_attn1", "audio_attn2", "audio_ff")

# Each preset is a set of block sub-modules; a mode's `auto` targets pick the preset of the same name where one
# exists (config.py). The official video IC-LoRA trains the same modules as the video preset.
PRESET_GROUPS: dict[str, tuple[str, ...]] = {
    "video": _VIDEO,
    "audio": _AUDIO,
    "audio-video": tuple(MODULE_GROUPS),
    "ic-lora": _VIDEO,
    "audio-to-video": _VIDEO + ("audio_to_video_attn",),
    "video-to-audio": _AUDIO + ("video_to_audio_attn",),
}


def group_of(module: str) -> str | None:
    """The block sub-module a module path belongs to, e.g. `audio_ff` for `transformer_blocks.3.audio_ff.net.2`."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[0] == "transformer_blocks" and parts[2] in MODULE_GROUPS else None


def _preset_patterns(preset: str) -> list[str]:
    return [rf"{_BLOCK}{group}\.{_PROJECTIONS[MODULE_GROUPS[group]]}" for group in PRESET_GROUPS[preset]]


def target_regex(targets: str | list[str]) -> str:
    """One PEFT `target_modules` regex for a preset name or a list of module-name suffixes.

    A list entry matches a module whose name is the entry or ends with `.entry` (PEFT's list semantics), so
    `["to_q", "ff.net.2"]` works as users expect from other trainers.
    """
    if isinstance(targets, str):
        if targets not in PRESET_GROUPS:
            raise ValueError(f"unknown LoRA target preset {targets!r}; presets: {', '.join(PRESET_GROUPS)}")
        patterns = _preset_patterns(targets)
    else:
        patterns = [rf"(.*\.)?{re.escape(suffix)}" for suffix in targets]
    return "|".join(f"(?:{p})" for p in patterns)


def matching_modules(model: torch.nn.Module, targets: str | list[str]) -> list[str]:
    """Names of the Linear layers a target spec selects, in model order."""
    pattern = re.compile(target_regex(targets))
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)
    ]


def inject_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: str | list[str]) -> list[str]:
    """Adds a LoRA adapter in place, freezes the base, keeps LoRA parameters in fp32. Returns the adapted modules."""
    modules = matching_modules(model, targets)
    if not modules:
        raise ValueError(f"LoRA targets {targets!r} match no Linear layer of the transformer")
    model.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_regex(targets),
        init_lora_weights=True,
    )
    model.add_adapter(config, adapter_name=ADAPTER_NAME)
    for param in lora_parameters(model):
        param.data = param.data.float()
        param.requires_grad_(True)
    return modules


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP-sharded one (a DTensor) is gathered from all processes, which is a collective that
    every process must call in the same order; any other tensor is returned as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def get_lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed `<module>.lora_A.weight` / `<module>.lora_B.weight` (PEFT layout, no prefix).

    Under FSDP the tensors are gathered whole from the shards: call it on every process, not only the main one."""
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {k: full_tensor(v.detach()).float().contiguous() for k, v in state.items()}


def set_lora_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads tensors from `get_lora_state_dict` back; every adapter tensor must be present, and nothing else.
    (Load before FSDP shards the model: the trainer does, and FSDP then shards the loaded values.)"""
    expected = set(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"LoRA state does not fit the model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
