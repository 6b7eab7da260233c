"""The other components' names and configs: text connectors, video VAE, audio VAE and vocoder, original -> diffusers.

The configs come from the single-file metadata sections, where a missing key means what ltx-core takes it to mean.
"""

from __future__ import annotations

import math
from typing import Any

from trainer.models.safetensors_files import WeightsError, _short
from trainer.models.transformer_keys import _CONNECTOR_PREFIXES, _GEMMA3_HIDDEN_SIZE, _block_count


# ---------------------------------------------------------------------------------------------------------------
# Text connectors (with the text-embedding projection)
# ---------------------------------------------------------------------------------------------------------------

_CONNECTOR_HEAD_DIM = 128  # LTX-2 head size, used to count heads only where no gate shape or config tells
# Connector settings no tensor shows, as published (diffusers `LTX2TextConnectors` names).
_CONNECTOR_FAMILY_SETTINGS: dict[str, Any] = {
    "connector_rope_base_seq_len": 4096,
    "rope_theta": 10000.0,
    "rope_double_precision": True,
    "rope_type": "split",
    "causal_temporal_positioning": False,
}
_CONNECTOR_PREFIX_RENAMES = {
    _CONNECTOR_PREFIXES[0]: "video_connector.",
    _CONNECTOR_PREFIXES[1]: "audio_connector.",
    "text_embedding_projection.aggregate_embed.": "text_proj_in.",  # LTX-2: one projection (feature extractor V1)
    "text_embedding_projection.video_aggregate_embed.": "video_text_proj_in.",  # LTX-2.3: one per modality (V2)
    "text_embedding_projection.audio_aggregate_embed.": "audio_text_proj_in.",
}
_CONNECTOR_PART_RENAMES = {"transformer_1d_blocks": "transformer_blocks", "q_norm": "norm_q", "k_norm": "norm_k"}


def _connector_name(key: str) -> str:
    for prefix, renamed in _CONNECTOR_PREFIX_RENAMES.items():
        if key.startswith(prefix):
            parts = key[len(prefix) :].split(".")
            return renamed + ".".join(_CONNECTOR_PART_RENAMES.get(part, part) for part in parts)
    return key  # reported as not in the model


def _connectors_config(where: str, section: dict[str, Any], shapes, transformer_config) -> dict[str, Any]:
    """`LTX2TextConnectors` config: dimensions from the shapes, the rest from the metadata transformer section."""
    per_modality = "video_text_proj_in.weight" in shapes
    projection = "video_text_proj_in" if per_modality else "text_proj_in"
    if projection + ".weight" not in shapes:
        raise WeightsError(f"{where}: no text_embedding_projection weight among the connector tensors")
    out_features, in_features = shapes[projection + ".weight"]
    # LTX-2 projects the Gemma features to the caption width itself; LTX-2.3 projects straight to the stream widths.
    caption_channels = section.get("caption_channels", _GEMMA3_HIDDEN_SIZE) if per_modality else out_features
    if in_features % caption_channels:
        raise WeightsError(
            f"{where}: the text projection takes {in_features} features, no multiple of the text encoder width "
            f"{caption_channels}"
        )
    config = {
        **_CONNECTOR_FAMILY_SETTINGS,
        "caption_channels": caption_channels,
        "text_proj_in_factor": in_features // caption_channels,
        "per_modality_projections": per_modality,
        "proj_bias": projection + ".bias" in shapes,
        "video_hidden_dim": transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"],
        "audio_hidden_dim": (
            transformer_config["audio_num_attention_heads"] * transformer_config["audio_attention_head_dim"]
        ),
    }
    if per_modality:
        config["video_hidden_dim"] = out_features
        config["audio_hidden_dim"] = shapes["audio_text_proj_in.weight"][0]
    if "connector_positional_embedding_max_pos" in section:
        config["connector_rope_base_seq_len"] = section["connector_positional_embedding_max_pos"][0]
    if "positional_embedding_theta" in section:
        config["rope_theta"] = float(section["positional_embedding_theta"])
    if "frequencies_precision" in section:
        config["rope_double_precision"] = section["frequencies_precision"] == "float64"
    for setting in ("rope_type", "causal_temporal_positioning"):
        if setting in section:
            config[setting] = section[setting]
    for stream in ("video", "audio"):
        config.update(_connector_stack(where, stream, shapes, section))
    return config


def _connector_stack(where: str, stream: str, shapes, section: dict[str, Any]) -> dict[str, Any]:
    """Heads, head size, depth, registers and gating of one connector, checked against the declared values."""
    prefix = f"{stream}_connector."
    block = prefix + "transformer_blocks.0.attn1."
    if block + "to_q.weight" not in shapes:
        raise WeightsError(f"{where}: no {stream} text connector blocks among the connector tensors")
    width = shapes[block + "to_q.weight"][0]
    gate = shapes.get(block + "to_gate_logits.weight")
    registers = shapes.get(prefix + "learnable_registers")

    def declared(setting: str) -> Any:
        # ltx-core: the audio connector falls back to the video connector's settings
        return section.get(f"audio_{setting}", section.get(setting)) if stream == "audio" else section.get(setting)

    said_heads = declared("connector_num_attention_heads")
    heads_setting = "audio_connector_num_attention_heads" if stream == "audio" else "connector_num_attention_heads"
    if gate is not None:
        heads = gate[0]  # the per-head output gate is Linear(dim, heads)
    elif said_heads is not None:
        if not isinstance(said_heads, int) or isinstance(said_heads, bool) or said_heads < 1:
            raise WeightsError(
                f"{where}: its config says {heads_setting}={said_heads!r} for the {stream} connector; expected a "
                "positive integer"
            )
        heads = said_heads
    elif width % _CONNECTOR_HEAD_DIM == 0:
        heads = width // _CONNECTOR_HEAD_DIM
    else:
        also = " (or connector_num_attention_heads)" if stream == "audio" else ""
        raise WeightsError(
            f"{where}: cannot tell the {stream} connector's attention heads: its width {width} is no multiple of "
            f"LTX-2's head size {_CONNECTOR_HEAD_DIM}, its blocks have no per-head gates and the checkpoint declares "
            f"no {heads_setting}{also}"
        )
    values = {
        "connector_num_attention_heads": heads,
        "connector_attention_head_dim": width // heads if width % heads == 0 else None,
        "connector_num_layers": _block_count(where, shapes, prefix + "transformer_blocks."),
        "connector_num_learnable_registers": registers[0] if registers is not None else None,
        "connector_apply_gated_attention": gate is not None,
    }
    if values["connector_attention_head_dim"] is None:
        raise WeightsError(f"{where}: the {stream} connector width {width} does not split into {heads} heads")
    for setting, value in values.items():
        said = declared(setting)
        if said is not None and said != value:
            raise WeightsError(
                f"{where}: the checkpoint contradicts itself: its config says {setting}={said!r} for the {stream} "
                f"connector but its tensors say {value!r}"
            )
    return {
        f"{stream}_connector_num_attention_heads": heads,
        f"{stream}_connector_attention_head_dim": values["connector_attention_head_dim"],
        f"{stream}_connector_num_layers": values["connector_num_layers"],
        f"{stream}_connector_num_learnable_registers": values["connector_num_learnable_registers"],
        f"{stream}_gated_attn": values["connector_apply_gated_attention"],
    }


# ---------------------------------------------------------------------------------------------------------------
# Video and audio VAEs
# ---------------------------------------------------------------------------------------------------------------

_VAE_PART_RENAMES = {
    "res_blocks": "resnets",
    "last_time_embedder": "time_embedder",
    "last_scale_shift_table": "scale_shift_table",
}
_VAE_STATISTICS = {
    "per_channel_statistics.mean-of-means": "latents_mean",
    "per_channel_statistics.std-of-means": "latents_std",
}
# Statistics the VAEs keep but never use (diffusers drops them too).
_UNUSED_VAE_STATISTICS = ("per_channel_statistics.channel", "per_channel_statistics.mean-of-stds")
_ENCODER_DOWNSAMPLES = {
    "compress_space_res": "spatial",
    "compress_time_res": "temporal",
    "compress_all_res": "spatiotemporal",
}
_DECODER_UPSAMPLES = {"compress_space": "spatial", "compress_time": "temporal", "compress_all": "spatiotemporal"}


def _video_vae_name(name: str, downsamplers: int) -> str:
    """Diffusers name of a video VAE tensor. The original keeps its blocks as one flat list per half, alternating
    resnet stacks and resamplers: encoder res, down, res, ..., res (the last is the mid block); decoder (bottleneck
    first) res, up, res, ... (the first is the mid block). Diffusers nests each resampler in its block."""
    if name in _VAE_STATISTICS:
        return _VAE_STATISTICS[name]
    parts = name.split(".")
    if parts[:2] == ["encoder", "down_blocks"] and len(parts) > 2:
        index = int(parts[2])
        if index == 2 * downsamplers:
            head = ["mid_block"]
        elif index % 2 == 0:
            head = ["down_blocks", str(index // 2)]
        else:
            head = ["down_blocks", str(index // 2), "downsamplers", "0"]
        parts = ["encoder", *head, *parts[3:]]
    elif parts[:2] == ["decoder", "up_blocks"] and len(parts) > 2:
        index = int(parts[2])
        if index == 0:
            head = ["mid_block"]
        elif index % 2 == 1:
            head = ["up_blocks", str(index // 2), "upsamplers", "0"]
        else:
            head = ["up_blocks", str(index // 2 - 1)]
        parts = ["decoder", *head, *parts[3:]]
    return ".".join(_VAE_PART_RENAMES.get(part, part) for part in parts)


def _block_list(where: str, blocks: Any, resamplers: dict[str, str], field_name: str):
    """Splits an original block list `res_x, (resampler, res_x)*` into its res_x settings and its resamplers."""
    if not isinstance(blocks, list) or len(blocks) % 2 == 0:
        raise WeightsError(
            f"{where}: metadata vae.{field_name} must alternate 'res_x' with resamplers, starting and ending with "
            f"'res_x'; found {blocks!r}"
        )
    stacks, resampling = [], []
    for index, (name, params) in enumerate(blocks):
        params = {"num_layers": params} if isinstance(params, int) else params
        if index % 2 == 0 and name == "res_x":
            stacks.append(params)
        elif index % 2 == 1 and name in resamplers:
            resampling.append((resamplers[name], params))
        else:
            raise WeightsError(
                f"{where}: metadata vae.{field_name}[{index}] is {name!r}; supported block lists alternate 'res_x' "
                f"with one of {', '.join(resamplers)}, starting and ending with 'res_x'"
            )
    return stacks, resampling


def _video_vae_config(where: str, section: dict[str, Any]) -> dict[str, Any]:
    """`AutoencoderKLLTX2Video` config from the metadata `vae` section (ltx-core's `CausalVideoAutoencoder` fields)."""
    class_name = section.get("_class_name", "CausalVideoAutoencoder")
    if class_name != "CausalVideoAutoencoder":
        raise WeightsError(
            f"{where}: vae _class_name {class_name!r} (LTX-2.5's diffusion decoder?) is not supported yet"
        )
    for setting, supported in (("dims", 3), ("norm_layer", "pixel_norm"), ("latent_log_var", "uniform")):
        if section.get(setting, supported) != supported:
            raise WeightsError(
                f"{where}: vae {setting}={section[setting]!r} is not supported (LTX-2 uses {supported!r})"
            )
    encoder_stacks, downsamplers = _block_list(where, section.get("encoder_blocks"), _ENCODER_DOWNSAMPLES,
                                               "encoder_blocks")
    decoder_stacks, upsamplers = _block_list(where, section.get("decoder_blocks"), _DECODER_UPSAMPLES,
                                             "decoder_blocks")
    latent_channels = section.get("latent_channels", 128)
    # diffusers builds the encoder's first layer latent_channels wide; ltx-core builds it encoder_base_channels wide.
    # Every LTX-2 / LTX-2.3 release declares the two equal; a file that declares otherwise cannot be represented. (A
    # file that leaves it out is judged by its tensor shapes alone.)
    encoder_base = section.get("encoder_base_channels", latent_channels)
    if encoder_base != latent_channels:
        raise WeightsError(
            f"{where}: metadata vae.encoder_base_channels={encoder_base!r} differs from latent_channels="
            f"{latent_channels!r}; diffusers' AutoencoderKLLTX2Video builds its first encoder layer latent_channels "
            "wide, so only encoder_base_channels equal to latent_channels (as in every LTX-2 / LTX-2.3 release) is "
            "supported"
        )
    # The encoder widens from the latent width by each downsampler's multiplier.
    channels, encoder_channels = latent_channels, []
    for _, params in downsamplers:
        channels *= params.get("multiplier", 2)
        encoder_channels.append(channels)
    # The decoder list is written from the pixel end; each upsampler divides the channels entering it by its
    # multiplier, ending at decoder_base_channels.
    factors = [params.get("multiplier", 1) for _, params in upsamplers]
    base = section.get("decoder_base_channels", 128)
    decoder_channels = [base * math.prod(factors[: index + 1]) for index in range(len(factors))]
    patch_size = section.get("patch_size", 4)
    spatial_steps = sum(resampler in ("spatial", "spatiotemporal") for resampler, _ in downsamplers)
    temporal_steps = sum(resampler in ("temporal", "spatiotemporal") for resampler, _ in downsamplers)
    return {
        "in_channels": section.get("in_channels", 3),
        "out_channels": section.get("out_channels", 3),
        "latent_channels": latent_channels,
        "block_out_channels": tuple(encoder_channels),
        "down_block_types": ("LTX2VideoDownBlock3D",) * len(downsamplers),
        "layers_per_block": tuple(stack["num_layers"] for stack in encoder_stacks),
        "spatio_temporal_scaling": (True,) * len(downsamplers),
        "downsample_type": tuple(resampler for resampler, _ in downsamplers),
        "decoder_block_out_channels": tuple(decoder_channels),
        "decoder_layers_per_block": tuple(stack["num_layers"] for stack in decoder_stacks),
        "decoder_spatio_temporal_scaling": (True,) * len(upsamplers),
        "decoder_inject_noise": tuple(stack.get("inject_noise", False) for stack in decoder_stacks),
        # diffusers takes the upsampler kinds from the bottleneck, every other decoder list from the pixel end
        "upsample_type": tuple(resampler for resampler, _ in reversed(upsamplers)),
        "upsample_residual": tuple(params.get("residual", False) for _, params in upsamplers),
        "upsample_factor": tuple(factors),
        "timestep_conditioning": section.get("timestep_conditioning", True),
        "patch_size": patch_size,
        "patch_size_t": 1,
        "resnet_norm_eps": 1e-6,
        "scaling_factor": section.get("scaling_factor", 1.0),
        "encoder_causal": True,
        "decoder_causal": section.get("causal_decoder", False),
        # ltx-core: one `spatial_padding_mode` for both halves when given; else zeros to encode, reflect to decode
        "encoder_spatial_padding_mode": section.get(
            "spatial_padding_mode", section.get("encoder_spatial_padding_mode", "zeros")
        ),
        "decoder_spatial_padding_mode": section.get("spatial_padding_mode", "reflect"),
        "spatial_compression_ratio": patch_size * 2**spatial_steps,
        "temporal_compression_ratio": 2**temporal_steps,
    }


def _audio_vae_config(where: str, section: dict[str, Any]) -> dict[str, Any]:
    """`AutoencoderKLLTX2Audio` config from the metadata `audio_vae` section (model.params.ddconfig + preprocessing)."""
    model = _object(where, section, "model", "audio_vae")
    params = _object(where, model, "params", "audio_vae.model")
    ddconfig = params.get("ddconfig")
    if not isinstance(ddconfig, dict):
        raise WeightsError(
            f"{where}: metadata audio_vae has no model.params.ddconfig object (found {_short(ddconfig)}); cannot tell "
            "the audio VAE"
        )
    preprocessing = _object(where, section, "preprocessing", "audio_vae")
    stft = _object(where, preprocessing, "stft", "audio_vae.preprocessing")
    mel = _object(where, preprocessing, "mel", "audio_vae.preprocessing")
    variables = _object(where, section, "variables", "audio_vae")
    mel_bins = ddconfig.get("mel_bins") or mel.get("n_mel_channels") or variables.get("mel_bins")
    if not mel_bins:
        raise WeightsError(f"{where}: metadata audio_vae names no mel_bins (ddconfig, preprocessing.mel or variables)")
    attention = ddconfig.get("attn_resolutions", (8, 16, 32))
    return {
        "base_channels": ddconfig.get("ch", 128),
        "output_channels": ddconfig.get("out_ch", 2),
        "ch_mult": tuple(ddconfig.get("ch_mult", (1, 2, 4))),
        "num_res_blocks": ddconfig.get("num_res_blocks", 2),
        "attn_resolutions": tuple(attention) if attention else None,
        "in_channels": ddconfig.get("in_channels", 2),
        "resolution": ddconfig.get("resolution", 256),
        "latent_channels": ddconfig.get("z_channels", 8),
        "norm_type": ddconfig.get("norm_type", "pixel"),
        "causality_axis": ddconfig.get("causality_axis", "height"),
        "dropout": ddconfig.get("dropout", 0.0),
        "mid_block_add_attention": ddconfig.get("mid_block_add_attention", True),
        "sample_rate": params.get("sampling_rate", 16000),
        "mel_hop_length": stft.get("hop_length", 160),
        "is_causal": stft.get("causal", True),
        "mel_bins": mel_bins,
        "double_z": ddconfig.get("double_z", True),
    }


def _object(where: str, parent: dict[str, Any], name: str, parent_field: str) -> dict[str, Any]:
    """The JSON object `parent[name]` of a metadata section ({} when absent), refusing any other value."""
    value = parent.get(name, {})
    if not isinstance(value, dict):
        raise WeightsError(f"{where}: metadata {parent_field}.{name} is {_short(value)}; expected a JSON object")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Vocoder
# ---------------------------------------------------------------------------------------------------------------

_VOCODER_PART_RENAMES = {
    "ups": "upsamplers",
    "resblocks": "resnets",
    "conv_pre": "conv_in",
    "conv_post": "conv_out",
    "act_post": "act_out",
}


def _vocoder_name(key: str) -> str:
    # Strip `vocoder.` once: LTX-2.3 nests its generator as `vocoder.vocoder.*`.
    parts = [_VOCODER_PART_RENAMES.get(part, part) for part in key.removeprefix("vocoder.").split(".")]
    # BigVGAN's anti-aliased activations keep the downsampling filter one module deeper than diffusers.
    return ".".join(parts).replace("downsample.lowpass.", "downsample.")


def _generator_config(where: str, section: dict[str, Any], final_activation: bool, prefix: str = "") -> dict:
    """One HiFi-GAN / BigVGAN generator of the vocoder, from ltx-core's `Vocoder` fields."""
    resblock = section.get("resblock", "1")
    if resblock not in ("1", "AMP1") or not section.get("stereo", True):
        raise WeightsError(
            f"{where}: vocoder resblock={resblock!r} stereo={section.get('stereo', True)!r} is not supported "
            "(LTX-2: '1', LTX-2.3: 'AMP1', both stereo)"
        )
    bigvgan = resblock == "AMP1"
    if final_activation:
        final = "tanh" if section.get("use_tanh_at_final", True) else "clamp"
    else:
        final = None
    config = {
        "in_channels": 128,  # stereo x 64 mel bins, fixed in ltx-core
        "hidden_channels": section.get("upsample_initial_channel", 1024),
        "out_channels": 2,
        "upsample_kernel_sizes": list(section.get("upsample_kernel_sizes", [16, 15, 8, 4, 4])),
        "upsample_factors": list(section.get("upsample_rates", [6, 5, 2, 2, 2])),
        "resnet_kernel_sizes": list(section.get("resblock_kernel_sizes", [3, 7, 11])),
        "resnet_dilations": [list(d) for d in section.get("resblock_dilation_sizes", [[1, 3, 5]] * 3)],
        "act_fn": section.get("activation", "snake") if bigvgan else "leaky_relu",
        "leaky_relu_negative_slope": 0.1,
        "antialias": bigvgan,
        "antialias_ratio": 2,
        "antialias_kernel_size": 12,
        "final_act_fn": final,
        "final_bias": section.get("use_bias_at_final", True),
    }
    return {prefix + key: value for key, value in config.items()}


def _vocoder_config(where: str, section: dict[str, Any]) -> dict[str, Any]:
    return {
        **_generator_config(where, section, final_activation=True),
        "output_sampling_rate": section.get("output_sampling_rate", 24000),
    }


def _vocoder_with_bwe_config(where: str, section: dict[str, Any]) -> dict[str, Any]:
    bwe = section["bwe"]
    missing = [key for key in ("n_fft", "hop_length", "num_mels", "input_sampling_rate", "output_sampling_rate")
               if key not in bwe]
    if missing:
        raise WeightsError(f"{where}: metadata vocoder.bwe lacks {', '.join(missing)}")
    return {
        # ltx-core applies the stage-1 generator's final tanh/clamp; its BWE generator has none
        **_generator_config(where, section.get("vocoder", {}), final_activation=True),
        **_generator_config(where, bwe, final_activation=False, prefix="bwe_"),
        "filter_length": bwe["n_fft"],
        "hop_length": bwe["hop_length"],
        "window_length": bwe["n_fft"],
        "num_mel_channels": bwe["num_mels"],
        "input_sampling_rate": bwe["input_sampling_rate"],
        "output_sampling_rate": bwe["output_sampling_rate"],
    }
