"""The transformer's names and architecture: original keys -> diffusers names, its config from shapes and metadata."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainer.models.safetensors_files import WeightsError, _is_quant_companion

TRANSFORMER_PREFIX = "model.diffusion_model."
_CONNECTOR_PREFIXES = (
    TRANSFORMER_PREFIX + "video_embeddings_connector.",
    TRANSFORMER_PREFIX + "audio_embeddings_connector.",
)

# Transformer settings that no tensor shape shows, as every published LTX-2 and LTX-2.3 checkpoint declares them
# (diffusers names). Used only where the checkpoint itself says nothing.
_TRANSFORMER_FAMILY_SETTINGS: dict[str, Any] = {
    "patch_size": 1,
    "patch_size_t": 1,
    "audio_patch_size": 1,
    "audio_patch_size_t": 1,
    "vae_scale_factors": (8, 32, 32),
    "audio_scale_factor": 4,
    "audio_sampling_rate": 16000,
    "audio_hop_length": 160,
    "pos_embed_max_pos": 20,
    "base_height": 2048,
    "base_width": 2048,
    "audio_pos_embed_max_pos": 20,
    "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_double_precision": True,
    "rope_type": "split",
    "causal_offset": 1,
    "timestep_scale_multiplier": 1000,
    "cross_attn_timestep_scale_multiplier": 1000,  # real checkpoints say 1000; ltx-core's fallback of 1 is wrong
}
_VIDEO_HEAD_DIM = 128  # LTX-2 head sizes, used to count heads only where no gate shape or config tells
_AUDIO_HEAD_DIM = 64
_GEMMA3_HIDDEN_SIZE = 3840  # Gemma 3 12B, the text encoder of LTX-2 and LTX-2.3
# Original config values the diffusers classes implement; anything else is refused rather than silently ignored.
_REQUIRED_TRANSFORMER_SETTINGS = {
    "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm",
    "standardization_norm": "rms_norm",
    "norm_elementwise_affine": False,
    "positional_embedding_type": "rope",
    "use_middle_indices_grid": True,
    "connector_norm_output": True,
    "connector_ff_bias": True,
}

# Original -> diffusers names of the transformer's top-level modules. Matched on the whole first path component, so
# `adaln_single` never touches `av_ca_*_adaln_single` or `prompt_adaln_single`, nor `patchify_proj`
# `audio_patchify_proj`.
_TRANSFORMER_TOP_RENAMES = {
    "patchify_proj": "proj_in",
    "audio_patchify_proj": "audio_proj_in",
    "adaln_single": "time_embed",
    "audio_adaln_single": "audio_time_embed",
    "prompt_adaln_single": "prompt_adaln",  # LTX-2.3; diffusers 0.42.1's single-file converter leaves these unmapped
    "audio_prompt_adaln_single": "audio_prompt_adaln",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
}
# Renames of single path components anywhere in a transformer name.
_TRANSFORMER_PART_RENAMES = {
    "q_norm": "norm_q",
    "k_norm": "norm_k",
    "scale_shift_table_a2v_ca_video": "video_a2v_cross_attn_scale_shift_table",
    "scale_shift_table_a2v_ca_audio": "audio_a2v_cross_attn_scale_shift_table",
}


def convert_transformer_keys(keys: Iterable[str]) -> dict[str, str]:
    """Diffusers name -> original key, for every transformer tensor among the checkpoint `keys`.

    Left out: keys outside `model.diffusion_model.` (VAE, audio VAE, vocoder, text projection), the text connectors
    inside it, and scaled-fp8 companions (scales are applied on load)."""
    names = {}
    for key in keys:
        if not key.startswith(TRANSFORMER_PREFIX) or key.startswith(_CONNECTOR_PREFIXES) or _is_quant_companion(key):
            continue
        parts = key[len(TRANSFORMER_PREFIX) :].split(".")
        parts[0] = _TRANSFORMER_TOP_RENAMES.get(parts[0], parts[0])
        names[".".join(_TRANSFORMER_PART_RENAMES.get(part, part) for part in parts)] = key
    return names


def _declared_from_metadata(path: Path, section: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """The metadata `transformer` section in diffusers names: name -> (original field, value)."""
    for setting, required in _REQUIRED_TRANSFORMER_SETTINGS.items():
        if setting in section and section[setting] != required:
            raise WeightsError(
                f"{path}: its config sets {setting}={section[setting]!r}; only {required!r} (what LTX-2 and LTX-2.3 "
                "use) is supported"
            )
    declared: dict[str, tuple[str, Any]] = {}

    def take(name: str, original: str, convert=lambda value: value) -> None:
        if original in section:
            declared[name] = (original, convert(section[original]))

    for same in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                 "cross_attention_dim", "caption_channels", "audio_num_attention_heads", "audio_attention_head_dim",
                 "audio_in_channels", "audio_out_channels", "audio_cross_attention_dim", "norm_eps", "rope_type"):
        take(same, same)
    for stream in ("", "audio_"):
        take(f"{stream}gated_attn", "apply_gated_attention")
        take(f"{stream}cross_attn_mod", "cross_attention_adaln")
    take("use_prompt_embeddings", "caption_proj_before_connector", lambda v: not v)
    take("rope_double_precision", "frequencies_precision", lambda v: v == "float64")
    take("rope_theta", "positional_embedding_theta", float)
    take("pos_embed_max_pos", "positional_embedding_max_pos", lambda v: v[0])
    take("base_height", "positional_embedding_max_pos", lambda v: v[1])
    take("base_width", "positional_embedding_max_pos", lambda v: v[2])
    take("audio_pos_embed_max_pos", "audio_positional_embedding_max_pos", lambda v: v[0])
    take("timestep_scale_multiplier", "timestep_scale_multiplier", _whole)
    take("cross_attn_timestep_scale_multiplier", "av_ca_timestep_scale_multiplier", _whole)
    return declared


def _transformer_config(where: str, shapes: dict[str, tuple[int, ...]], declared) -> tuple[str, dict[str, Any]]:
    """(version, diffusers config) from the transformer's tensor shapes (diffusers names) and its declared config."""

    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise WeightsError(f"{where}: the transformer has no {name!r} tensor; is this a complete LTX-2 checkpoint?")
        return shapes[name]

    block = "transformer_blocks.0."
    inner, in_channels = shape("proj_in.weight")
    audio_inner, audio_in_channels = shape("audio_proj_in.weight")
    gated = block + "attn1.to_gate_logits.weight" in shapes
    audio_gated = block + "audio_attn1.to_gate_logits.weight" in shapes
    modulated = block + "prompt_scale_shift_table" in shapes
    audio_modulated = block + "audio_prompt_scale_shift_table" in shapes
    caption_projection = "caption_projection.linear_1.weight" in shapes

    found_25 = []
    if block + "ff.net.0.proj.weight" in shapes and block + "ff.net.0.proj.bias" not in shapes:
        found_25.append("video feed-forward without biases")
    if "keyframes_abs_pos_embedding" in shapes:
        found_25.append("keyframes_abs_pos_embedding")
    if modulated and "prompt_adaln.linear.weight" not in shapes:
        found_25.append("prompt modulation without prompt_adaln_single")
    if found_25:
        raise WeightsError(f"{where}: an LTX-2.5 transformer ({', '.join(found_25)}); LTX-2.5 is not supported yet")
    if gated != audio_gated or modulated != audio_modulated or (gated or modulated) == caption_projection:
        raise WeightsError(
            f"{where}: cannot tell LTX-2 from LTX-2.3: per-head gates video={gated} audio={audio_gated}, prompt "
            f"modulation video={modulated} audio={audio_modulated}, caption projection={caption_projection}. LTX-2 "
            "has a caption projection and neither gates nor prompt modulation; LTX-2.3 has both and no projection"
        )
    version = "2.3" if gated or modulated else "2.0"

    def heads(stream: str, width: int, head_dim: int) -> int:
        label = "audio" if stream else "video"
        setting = f"{stream}num_attention_heads"
        gate = shapes.get(block + f"{stream}attn1.to_gate_logits.weight")
        if gate is not None:
            count = gate[0]  # the per-head output gate is Linear(dim, heads)
        elif setting in declared:
            original, count = declared[setting]
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise WeightsError(f"{where}: its config says {original}={count!r}; expected a positive integer")
        elif width % head_dim == 0:
            count = width // head_dim
        else:
            raise WeightsError(
                f"{where}: cannot tell the {label} attention heads: the {label} width {width} is no multiple of "
                f"LTX-2's head size {head_dim}, the blocks have no per-head gates and the checkpoint declares no "
                f"{setting}"
            )
        if width % count:
            raise WeightsError(f"{where}: the {label} width {width} does not split into {count} heads")
        return count

    video_heads = heads("", inner, _VIDEO_HEAD_DIM)
    audio_heads = heads("audio_", audio_inner, _AUDIO_HEAD_DIM)
    inferred: dict[str, Any] = {
        "num_layers": _block_count(where, shapes, "transformer_blocks."),
        "in_channels": in_channels,
        "out_channels": shape("proj_out.weight")[0],
        "num_attention_heads": video_heads,
        "attention_head_dim": inner // video_heads,
        "cross_attention_dim": shape(block + "attn2.to_k.weight")[1],
        "audio_in_channels": audio_in_channels,
        "audio_out_channels": shape("audio_proj_out.weight")[0],
        "audio_num_attention_heads": audio_heads,
        "audio_attention_head_dim": audio_inner // audio_heads,
        "audio_cross_attention_dim": shape(block + "audio_attn2.to_k.weight")[1],
        "gated_attn": gated,
        "audio_gated_attn": audio_gated,
        "cross_attn_mod": modulated,
        "audio_cross_attn_mod": audio_modulated,
        "use_prompt_embeddings": caption_projection,
        "attention_bias": block + "attn1.to_q.bias" in shapes,
        "attention_out_bias": block + "attn1.to_out.0.bias" in shapes,
        "ff_bias": True,
        "audio_ff_bias": True,
        "use_prompt_adaln_single": True,
        "use_keyframes_abs_pos_embedding": False,
    }
    if caption_projection:
        inferred["caption_channels"] = shape("caption_projection.linear_1.weight")[1]
    for name, value in inferred.items():
        if name in declared and declared[name][1] != value:
            original, said = declared[name]
            raise WeightsError(
                f"{where}: the checkpoint contradicts itself: its config says {original}={said!r} but its tensors "
                f"say {name}={value!r}"
            )
    by_version = {
        # Not architecture: diffusers' attention processor that can perturb attention (STG), which the LTX-2.3
        # release uses (the diffusers LTX-2.3 conversion turns it on).
        "perturbed_attn": version == "2.3",
        "caption_channels": _GEMMA3_HIDDEN_SIZE,  # only LTX-2's caption projection uses it; its shape overrides this
    }
    declared_values = {name: value for name, (_, value) in declared.items()}
    return version, {**_TRANSFORMER_FAMILY_SETTINGS, **by_version, **declared_values, **inferred}


def _block_count(where: str, names: Iterable[str], prefix: str) -> int:
    """How many `<prefix>N.` blocks there are, refusing gaps in the numbering."""
    indices = {int(name[len(prefix) :].split(".", 1)[0]) for name in names if name.startswith(prefix)}
    if not indices or indices != set(range(len(indices))):
        raise WeightsError(f"{where}: {prefix}N blocks are not numbered 0..N-1: found {sorted(indices)[:12]}")
    return len(indices)


def _whole(value: Any) -> Any:
    """1000.0 -> 1000: metadata JSON writes integral settings as floats."""
    return int(value) if isinstance(value, float) and value.is_integer() else value
