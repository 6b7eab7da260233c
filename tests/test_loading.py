"""Checkpoint loading: tiny random models written in the public layouts load back into models that compute the same.

Fixtures are written the way real checkpoints are: original Lightricks key names (converted back from diffusers names by
an inverse mapping written here, independent of the loader's) with the metadata `config` in Lightricks' field names,
a transformer-only file with and without that metadata, and a diffusers pipeline folder.
"""

from __future__ import annotations

import json
import re

import pytest
import safetensors.torch
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, LTX2VideoTransformer3DModel
from diffusers.pipelines.ltx2 import LTX2TextConnectors, LTX2Vocoder, LTX2VocoderWithBWE
from safetensors.torch import save_file

from trainer.models import loading
from trainer.models.component_keys import _connector_stack
from trainer.models.loading import (
    WeightsError,
    _transformer_config,
    check_weights,
    convert_transformer_keys,
    detect_checkpoint,
    load_audio_vae,
    load_connectors,
    load_transformer,
    load_video_vae,
    load_vocoder,
)
from trainer.models.registry import TARGETS, build_random_transformer

P = "model.diffusion_model."
VERSIONS = {"2.3": "tiny-ltx-2.3", "2.0": "tiny-ltx-2"}

# ---------------------------------------------------------------------------------------------------------------
# Tiny components: the original (Lightricks) config next to the diffusers config it stands for
# ---------------------------------------------------------------------------------------------------------------


DOWNSAMPLES = ("spatial", "temporal", "spatiotemporal", "spatiotemporal")
STATISTICS = {
    "latents_mean": "per_channel_statistics.mean-of-means",
    "latents_std": "per_channel_statistics.std-of-means",
}


def _res(layers, **extra):
    return ["res_x", {"num_layers": layers, **extra}]


VIDEO_VAE = {
    # The LTX-2.3 block list (32x32x8, last encoder step keeps its width, decoder without residual upsamplers).
    "2.3": (
        {
            "_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3,
            "latent_channels": 8, "encoder_base_channels": 8, "decoder_base_channels": 8, "patch_size": 4,
            "norm_layer": "pixel_norm", "latent_log_var": "uniform", "causal_decoder": False,
            "spatial_padding_mode": "zeros", "timestep_conditioning": False, "scaling_factor": 1.0,
            "encoder_blocks": [
                _res(1), ["compress_space_res", {"multiplier": 2}], _res(1), ["compress_time_res", {"multiplier": 2}],
                _res(1), ["compress_all_res", {"multiplier": 2}], _res(1), ["compress_all_res", {"multiplier": 1}],
                _res(1),
            ],
            "decoder_blocks": [
                _res(1), ["compress_space", {"multiplier": 2}], _res(1), ["compress_time", {"multiplier": 2}], _res(1),
                ["compress_all", {"multiplier": 1}], _res(1), ["compress_all", {"multiplier": 2}], _res(1),
            ],
        },
        dict(
            in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(16, 32, 64, 64),
            decoder_block_out_channels=(16, 32, 32, 64), layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
            spatio_temporal_scaling=(True,) * 4, decoder_spatio_temporal_scaling=(True,) * 4,
            decoder_inject_noise=(False,) * 5, downsample_type=DOWNSAMPLES,
            upsample_type=("spatiotemporal", "spatiotemporal", "temporal", "spatial"), upsample_residual=(False,) * 4,
            upsample_factor=(2, 2, 1, 2), timestep_conditioning=False, patch_size=4, patch_size_t=1,
            resnet_norm_eps=1e-6, encoder_causal=True, decoder_causal=False, encoder_spatial_padding_mode="zeros",
            decoder_spatial_padding_mode="zeros", spatial_compression_ratio=32, temporal_compression_ratio=8,
        ),
    ),
    # The LTX-2 block list (residual upsamplers), here with a timestep-conditioned decoder.
    "2.0": (
        {
            "_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3,
            "latent_channels": 8, "decoder_base_channels": 8, "patch_size": 4, "norm_layer": "pixel_norm",
            "latent_log_var": "uniform", "causal_decoder": False, "timestep_conditioning": True,
            "encoder_spatial_padding_mode": "zeros", "decoder_spatial_padding_mode": "reflect",
            "encoder_blocks": [
                _res(1), ["compress_space_res", {"multiplier": 2}], _res(1), ["compress_time_res", {"multiplier": 2}],
                _res(1), ["compress_all_res", {"multiplier": 2}], _res(1), ["compress_all_res", {"multiplier": 2}],
                _res(1),
            ],
            "decoder_blocks": [
                _res(1, inject_noise=False), ["compress_all", {"residual": True, "multiplier": 2}],
                _res(1, inject_noise=False), ["compress_all", {"residual": True, "multiplier": 2}],
                _res(1, inject_noise=False), ["compress_all", {"residual": True, "multiplier": 2}],
                _res(1, inject_noise=False),
            ],
        },
        dict(
            in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(16, 32, 64, 128),
            decoder_block_out_channels=(16, 32, 64), layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 4,
            spatio_temporal_scaling=(True,) * 4, decoder_spatio_temporal_scaling=(True,) * 3,
            decoder_inject_noise=(False,) * 4, downsample_type=DOWNSAMPLES,
            upsample_type=("spatiotemporal",) * 3, upsample_residual=(True,) * 3, upsample_factor=(2, 2, 2),
            timestep_conditioning=True, patch_size=4, patch_size_t=1, resnet_norm_eps=1e-6, encoder_causal=True,
            decoder_causal=False, encoder_spatial_padding_mode="zeros", decoder_spatial_padding_mode="reflect",
            spatial_compression_ratio=32, temporal_compression_ratio=8,
        ),
    ),
}

AUDIO_VAE = (
    {
        "model": {"params": {"sampling_rate": 16000, "ddconfig": {
            "ch": 16, "out_ch": 2, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [], "resolution": 256,
            "z_channels": 8, "double_z": True, "norm_type": "pixel", "causality_axis": "height", "dropout": 0.0,
            "mid_block_add_attention": False, "in_channels": 2, "mel_bins": 64,
        }}},
        "preprocessing": {
            "stft": {"hop_length": 160, "filter_length": 1024, "causal": True},
            "mel": {"n_mel_channels": 64},
        },
    },
    dict(
        base_channels=16, output_channels=2, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=256, latent_channels=8, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=64,
        double_z=True,
    ),
)

_GENERATOR = {"upsample_initial_channel": 32, "upsample_rates": [2, 2], "upsample_kernel_sizes": [4, 4],
              "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3]], "stereo": True}
VOCODER = {
    "2.0": (
        {**_GENERATOR, "resblock": "1", "output_sampling_rate": 24000, "use_tanh_at_final": True,
         "use_bias_at_final": True},
        (LTX2Vocoder, dict(
            in_channels=128, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
            resnet_kernel_sizes=[3], resnet_dilations=[[1, 3]], act_fn="leaky_relu", leaky_relu_negative_slope=0.1,
            antialias=False, final_act_fn="tanh", final_bias=True, output_sampling_rate=24000,
        )),
    ),
    # BigVGAN v2 + bandwidth extension; the BWE upsampling (4 x 6) equals hop_length x (48 kHz / 16 kHz).
    "2.3": (
        {
            "vocoder": {**_GENERATOR, "resblock": "AMP1", "activation": "snakebeta", "use_tanh_at_final": False,
                        "use_bias_at_final": False},
            "bwe": {"resblock": "AMP1", "activation": "snakebeta", "stereo": True, "upsample_initial_channel": 16,
                    "upsample_rates": [4, 6], "upsample_kernel_sizes": [8, 12], "resblock_kernel_sizes": [3],
                    "resblock_dilation_sizes": [[1]], "use_tanh_at_final": False, "use_bias_at_final": False,
                    "n_fft": 64, "hop_length": 8, "num_mels": 64, "input_sampling_rate": 16000,
                    "output_sampling_rate": 48000},
        },
        (LTX2VocoderWithBWE, dict(
            in_channels=128, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
            resnet_kernel_sizes=[3], resnet_dilations=[[1, 3]], act_fn="snakebeta", antialias=True,
            antialias_ratio=2, antialias_kernel_size=12, final_act_fn="clamp", final_bias=False, bwe_in_channels=128,
            bwe_hidden_channels=16, bwe_out_channels=2, bwe_upsample_kernel_sizes=[8, 12], bwe_upsample_factors=[4, 6],
            bwe_resnet_kernel_sizes=[3], bwe_resnet_dilations=[[1]], bwe_act_fn="snakebeta", bwe_antialias=True,
            bwe_final_act_fn=None, bwe_final_bias=False, filter_length=64, hop_length=8, window_length=64,
            num_mel_channels=64, input_sampling_rate=16000, output_sampling_rate=48000,
        )),
    ),
}

# Text connectors sized to the tiny transformers: LTX-2 projects Gemma features to the caption width (24), LTX-2.3
# straight to the video (32) and audio (16) widths, with gated 1D blocks.
CONNECTORS = {
    "2.0": dict(
        caption_channels=24, text_proj_in_factor=3, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=12, video_connector_num_layers=2, video_connector_num_learnable_registers=4,
        video_gated_attn=False, audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=12,
        audio_connector_num_layers=2, audio_connector_num_learnable_registers=4, audio_gated_attn=False,
        connector_rope_base_seq_len=4096, rope_theta=10000.0, rope_double_precision=True,
        causal_temporal_positioning=False, rope_type="split", per_modality_projections=False, video_hidden_dim=32,
        audio_hidden_dim=16, proj_bias=False,
    ),
    "2.3": dict(
        caption_channels=24, text_proj_in_factor=3, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=16, video_connector_num_layers=2, video_connector_num_learnable_registers=4,
        video_gated_attn=True, audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=8,
        audio_connector_num_layers=2, audio_connector_num_learnable_registers=4, audio_gated_attn=True,
        connector_rope_base_seq_len=4096, rope_theta=10000.0, rope_double_precision=True,
        causal_temporal_positioning=False, rope_type="split", per_modality_projections=True, video_hidden_dim=32,
        audio_hidden_dim=16, proj_bias=True,
    ),
}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every stored tensor random, so a tensor that was not loaded (or loaded into the wrong place) shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return model.eval()


def _bundle(version: str) -> dict:
    target = TARGETS[VERSIONS[version]]
    vocoder_cls, vocoder_config = VOCODER[version][1]
    return {
        "version": version,
        "transformer": _randomize(build_random_transformer(target, seed=1), 1),
        "connectors": _randomize(LTX2TextConnectors(**CONNECTORS[version]), 2),
        "video_vae": _randomize(AutoencoderKLLTX2Video(**VIDEO_VAE[version][1]), 3),
        "audio_vae": _randomize(AutoencoderKLLTX2Audio(**AUDIO_VAE[1]), 4),
        "vocoder": _randomize(vocoder_cls(**vocoder_config), 5),
    }


@pytest.fixture(scope="module", params=list(VERSIONS))
def bundle(request):
    return _bundle(request.param)


@pytest.fixture(scope="module")
def bundle23():
    return _bundle("2.3")


# ---------------------------------------------------------------------------------------------------------------
# Diffusers -> original names and configs (the inverse of what the loader does, written independently)
# ---------------------------------------------------------------------------------------------------------------

_TRANSFORMER_TOP = {
    "proj_in": "patchify_proj", "audio_proj_in": "audio_patchify_proj", "time_embed": "adaln_single",
    "audio_time_embed": "audio_adaln_single", "prompt_adaln": "prompt_adaln_single",
    "audio_prompt_adaln": "audio_prompt_adaln_single",
    "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
    "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
    "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
    "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single",
}
_TRANSFORMER_PARTS = {
    "norm_q": "q_norm", "norm_k": "k_norm",
    "video_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_video",
    "audio_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_audio",
}


def _original_transformer_key(name: str) -> str:
    head, _, rest = name.partition(".")
    parts = [_TRANSFORMER_TOP.get(head, head), *rest.split(".")] if rest else [_TRANSFORMER_TOP.get(head, head)]
    return P + ".".join(_TRANSFORMER_PARTS.get(part, part) for part in parts)


def _original_connector_key(name: str) -> str:
    for new, old in (("video_connector.", P + "video_embeddings_connector."),
                     ("audio_connector.", P + "audio_embeddings_connector."),
                     ("video_text_proj_in.", "text_embedding_projection.video_aggregate_embed."),
                     ("audio_text_proj_in.", "text_embedding_projection.audio_aggregate_embed."),
                     ("text_proj_in.", "text_embedding_projection.aggregate_embed.")):
        if name.startswith(new):
            parts = {"transformer_blocks": "transformer_1d_blocks", "norm_q": "q_norm", "norm_k": "k_norm"}
            return old + ".".join(parts.get(part, part) for part in name[len(new):].split("."))
    raise AssertionError(name)


def _original_video_vae_key(name: str, downsamplers: int) -> str:
    if name in STATISTICS:
        return "vae." + STATISTICS[name]
    encoder = re.match(r"encoder\.down_blocks\.(\d+)\.(downsamplers\.0\.)?(.*)$", name)
    if encoder:
        name = f"encoder.down_blocks.{2 * int(encoder[1]) + (1 if encoder[2] else 0)}.{encoder[3]}"
    decoder = re.match(r"decoder\.up_blocks\.(\d+)\.(upsamplers\.0\.)?(.*)$", name)
    if decoder:
        name = f"decoder.up_blocks.{2 * int(decoder[1]) + (1 if decoder[2] else 2)}.{decoder[3]}"
    name = re.sub(r"^encoder\.mid_block\.", f"encoder.down_blocks.{2 * downsamplers}.", name)
    name = re.sub(r"^decoder\.mid_block\.", "decoder.up_blocks.0.", name)
    name = re.sub(r"^decoder\.time_embedder\.", "decoder.last_time_embedder.", name)
    name = re.sub(r"^decoder\.scale_shift_table$", "decoder.last_scale_shift_table", name)
    return "vae." + name.replace(".resnets.", ".res_blocks.")


def _original_vocoder_key(name: str) -> str:
    parts = {"upsamplers": "ups", "resnets": "resblocks", "conv_in": "conv_pre", "conv_out": "conv_post",
             "act_out": "act_post"}
    name = ".".join(parts.get(part, part) for part in name.split("."))
    return "vocoder." + name.replace("downsample.filter", "downsample.lowpass.filter")


def _original_state(bundle: dict, components=("transformer", "connectors", "video_vae", "audio_vae", "vocoder")):
    state = {}
    if "transformer" in components:
        state.update({_original_transformer_key(k): v for k, v in bundle["transformer"].state_dict().items()})
    if "connectors" in components:
        state.update({_original_connector_key(k): v for k, v in bundle["connectors"].state_dict().items()})
    if "video_vae" in components:
        downsamplers = len(bundle["video_vae"].config.downsample_type)
        state.update({_original_video_vae_key(k, downsamplers): v for k, v in bundle["video_vae"].state_dict().items()})
        latent = bundle["video_vae"].config.latent_channels
        state["vae.per_channel_statistics.channel"] = torch.arange(latent, dtype=torch.float32)  # kept by real files
        state["vae.per_channel_statistics.mean-of-stds"] = torch.ones(latent)
    if "audio_vae" in components:
        state.update({"audio_vae." + STATISTICS.get(k, k): v for k, v in bundle["audio_vae"].state_dict().items()})
    if "vocoder" in components:
        state.update({_original_vocoder_key(k): v for k, v in bundle["vocoder"].state_dict().items()})
    return {k: v.contiguous() for k, v in state.items()}


def _original_transformer_section(version: str) -> dict:
    cfg = TARGETS[VERSIONS[version]].transformer_config
    connectors = CONNECTORS[version]
    section = {key: cfg[key] for key in (
        "num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "cross_attention_dim",
        "caption_channels", "audio_num_attention_heads", "audio_attention_head_dim", "audio_in_channels",
        "audio_out_channels", "audio_cross_attention_dim", "norm_eps", "rope_type")}
    section.update({
        "positional_embedding_theta": 10000.0, "positional_embedding_max_pos": [20, 2048, 2048],
        "audio_positional_embedding_max_pos": [20], "timestep_scale_multiplier": 1000,
        "av_ca_timestep_scale_multiplier": 1000.0, "frequencies_precision": "float64",
        "activation_fn": "gelu-approximate", "qk_norm": "rms_norm", "standardization_norm": "rms_norm",
        "norm_elementwise_affine": False, "use_middle_indices_grid": True, "dropout": 0.0, "attention_bias": True,
        "connector_num_attention_heads": connectors["video_connector_num_attention_heads"],
        "connector_attention_head_dim": connectors["video_connector_attention_head_dim"],
        "connector_num_layers": connectors["video_connector_num_layers"],
        "connector_num_learnable_registers": connectors["video_connector_num_learnable_registers"],
        "connector_positional_embedding_max_pos": [4096],
    })
    if version == "2.3":  # LTX-2 files leave the 2.3 switches out; their absence means "off"
        section.update({
            "apply_gated_attention": True, "cross_attention_adaln": True, "connector_apply_gated_attention": True,
            "audio_connector_num_attention_heads": connectors["audio_connector_num_attention_heads"],
            "audio_connector_attention_head_dim": connectors["audio_connector_attention_head_dim"],
            "caption_proj_before_connector": True, "caption_projection_first_linear": False,
            "caption_proj_input_norm": False, "caption_projection_second_linear": False,
        })
    return section


def _metadata(version: str, **replace) -> dict[str, str]:
    config = {
        "transformer": _original_transformer_section(version),
        "vae": VIDEO_VAE[version][0],
        "audio_vae": AUDIO_VAE[0],
        "vocoder": VOCODER[version][0],
        "scheduler": {"_class_name": "RectifiedFlowScheduler", "num_train_timesteps": 1000},
    }
    for section, values in replace.items():
        config[section] = {**config[section], **values}
    return {"config": json.dumps(config), "model_version": "2.3.0" if version == "2.3" else "2.0.0"}


def _write(path, state, metadata=None):
    save_file(state, str(path), metadata=metadata)
    return path


def _write_diffusers_transformer(root, bundle, state):
    """A diffusers pipeline folder holding only transformer/ (config.json + `state` under diffusers names)."""
    folder = root / "transformer"
    folder.mkdir(parents=True)
    bundle["transformer"].save_config(folder)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return root


def _write_raw_safetensors(path, header, data_bytes=16):
    """A file with a hand-written safetensors header (8-byte length, JSON), for headers save_file would not write."""
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data_bytes))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Forward comparisons
# ---------------------------------------------------------------------------------------------------------------


def _same(a, b):
    # Weights load bit-identical; safetensors' buffers are not 64-byte aligned, so CPU kernels may sum in another
    # order (differences of a few 1e-6).
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _same_state(loaded, source):
    expected = source.state_dict()
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, expected[name]), name


@torch.no_grad()
def _transformer_outputs(model, version):
    target = TARGETS[VERSIONS[version]]
    g = torch.Generator().manual_seed(7)
    frames, height, width, audio_tokens, text_tokens = 2, 2, 2, 5, 8
    video_tokens = frames * height * width
    sigma = torch.tensor([0.3]) * 1000
    audio_sigma = torch.tensor([0.6]) * 1000
    return model(
        hidden_states=torch.randn(1, video_tokens, 128, generator=g),
        audio_hidden_states=torch.randn(1, audio_tokens, 128, generator=g),
        encoder_hidden_states=torch.randn(1, text_tokens, target.video_text_dim, generator=g),
        audio_encoder_hidden_states=torch.randn(1, text_tokens, target.audio_text_dim, generator=g),
        encoder_attention_mask=torch.ones(1, text_tokens),
        audio_encoder_attention_mask=torch.ones(1, text_tokens),
        timestep=sigma.expand(1, video_tokens), audio_timestep=audio_sigma.expand(1, audio_tokens),
        sigma=sigma, audio_sigma=audio_sigma, num_frames=frames, height=height, width=width, fps=24.0,
        audio_num_frames=audio_tokens, use_cross_timestep=True, return_dict=False,
    )


@torch.no_grad()
def _component_outputs(component, model, version):
    g = torch.Generator().manual_seed(8)
    if component == "connectors":
        hidden = torch.randn(2, 8, 24, 3, generator=g)
        mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
        return model(hidden, mask)
    if component == "video_vae":
        latents = model.encode(torch.randn(1, 3, 9, 64, 64, generator=g)).latent_dist.mean
        temb = torch.tensor([0.05]) if model.config.timestep_conditioning else None
        return latents, model.decode(latents, temb=temb).sample, model.latents_mean, model.latents_std
    if component == "audio_vae":
        latents = model.encode(torch.randn(1, 2, 8, 64, generator=g)).latent_dist.mean
        return latents, model.decode(latents).sample, model.latents_mean, model.latents_std
    return model(torch.randn(1, 2, 8, 64, generator=g))


COMPONENT_LOADERS = {
    "connectors": load_connectors,
    "video_vae": load_video_vae,
    "audio_vae": load_audio_vae,
    "vocoder": load_vocoder,
}


def _expected(bundle, component):
    """The source model's outputs, computed once per bundle."""
    cache = bundle.setdefault("outputs", {})
    if component not in cache:
        model, version = bundle[component], bundle["version"]
        run = _transformer_outputs if component == "transformer" else lambda m, v: _component_outputs(component, m, v)
        cache[component] = run(model, version)
    return cache[component]


def _assert_loads_every_component(path, bundle):
    version = bundle["version"]
    transformer = load_transformer(path, torch.float32)
    _same_state(transformer, bundle["transformer"])
    _same(_transformer_outputs(transformer, version), _expected(bundle, "transformer"))
    for component, load in COMPONENT_LOADERS.items():
        loaded = load(path)
        assert type(loaded) is type(bundle[component])
        _same_state(loaded, bundle[component])
        _same(_component_outputs(component, loaded, version), _expected(bundle, component))


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def test_key_conversion_renames_whole_names_and_leaves_out_other_components():
    keys = [
        P + "patchify_proj.weight",
        P + "audio_patchify_proj.bias",
        P + "adaln_single.emb.timestep_embedder.linear_1.weight",
        P + "audio_adaln_single.linear.weight",
        P + "prompt_adaln_single.linear.bias",
        P + "audio_prompt_adaln_single.emb.timestep_embedder.linear_2.weight",
        P + "av_ca_video_scale_shift_adaln_single.linear.weight",
        P + "av_ca_a2v_gate_adaln_single.linear.weight",
        P + "av_ca_audio_scale_shift_adaln_single.linear.weight",
        P + "av_ca_v2a_gate_adaln_single.linear.weight",
        P + "transformer_blocks.3.attn1.q_norm.weight",
        P + "transformer_blocks.3.audio_to_video_attn.k_norm.weight",
        P + "transformer_blocks.3.scale_shift_table_a2v_ca_video",
        P + "transformer_blocks.3.scale_shift_table_a2v_ca_audio",
        P + "transformer_blocks.3.prompt_scale_shift_table",
        P + "transformer_blocks.3.attn1.to_gate_logits.weight",
        P + "transformer_blocks.3.ff.net.0.proj.weight",
        P + "caption_projection.linear_1.weight",
        P + "transformer_blocks.3.attn2.to_q.weight_scale",
        P + "transformer_blocks.3.attn2.to_q.input_scale",
        P + "video_embeddings_connector.transformer_1d_blocks.0.attn1.q_norm.weight",
        P + "audio_embeddings_connector.learnable_registers",
        "text_embedding_projection.video_aggregate_embed.weight",
        "vae.encoder.conv_in.conv.weight",
        "audio_vae.per_channel_statistics.mean-of-means",
        "vocoder.conv_pre.weight",
    ]
    assert convert_transformer_keys(keys) == {
        "proj_in.weight": keys[0],
        "audio_proj_in.bias": keys[1],
        "time_embed.emb.timestep_embedder.linear_1.weight": keys[2],
        "audio_time_embed.linear.weight": keys[3],
        "prompt_adaln.linear.bias": keys[4],
        "audio_prompt_adaln.emb.timestep_embedder.linear_2.weight": keys[5],
        "av_cross_attn_video_scale_shift.linear.weight": keys[6],
        "av_cross_attn_video_a2v_gate.linear.weight": keys[7],
        "av_cross_attn_audio_scale_shift.linear.weight": keys[8],
        "av_cross_attn_audio_v2a_gate.linear.weight": keys[9],
        "transformer_blocks.3.attn1.norm_q.weight": keys[10],
        "transformer_blocks.3.audio_to_video_attn.norm_k.weight": keys[11],
        "transformer_blocks.3.video_a2v_cross_attn_scale_shift_table": keys[12],
        "transformer_blocks.3.audio_a2v_cross_attn_scale_shift_table": keys[13],
        "transformer_blocks.3.prompt_scale_shift_table": keys[14],
        "transformer_blocks.3.attn1.to_gate_logits.weight": keys[15],
        "transformer_blocks.3.ff.net.0.proj.weight": keys[16],
        "caption_projection.linear_1.weight": keys[17],
    }


def test_single_file_detects_and_loads_every_component(bundle, tmp_path):
    version = bundle["version"]
    path = _write(tmp_path / "ltx.safetensors", _original_state(bundle), _metadata(version))
    info = detect_checkpoint(path)
    assert (info.layout, info.family, info.version, info.fp8) == ("single-file", "ltx-2", version, False)
    assert info.components == ["transformer", "connectors", "text_projection", "video_vae", "audio_vae", "vocoder"]
    expected = TARGETS[VERSIONS[version]].transformer_config
    assert {k: info.transformer_config[k] for k in expected} == expected
    assert info.param_counts["transformer"] == sum(p.numel() for p in bundle["transformer"].parameters())
    assert info.dtype_counts["vocoder"] == {"F32": len(bundle["vocoder"].state_dict())}
    _assert_loads_every_component(path, bundle)


def test_transformer_loads_in_the_requested_dtype(bundle23, tmp_path):
    path = _write(tmp_path / "t.safetensors", _original_state(bundle23, ["transformer"]), _metadata("2.3"))
    model = load_transformer(path, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    source = bundle23["transformer"].state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, source[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("with_metadata", [True, False])
def test_transformer_only_file_with_or_without_metadata(bundle23, tmp_path, with_metadata):
    # As ComfyUI keeps it: the connectors stay in the transformer file, the text projection goes with the text encoder.
    state = _original_state(bundle23, ["transformer", "connectors"])
    state = {k: v for k, v in state.items() if not k.startswith("text_embedding_projection.")}
    path = _write(tmp_path / "t.safetensors", state, _metadata("2.3") if with_metadata else None)
    info = detect_checkpoint(path)
    assert (info.layout, info.version) == ("transformer-only", "2.3")
    assert info.components == ["transformer", "connectors"]
    expected = dict(TARGETS["tiny-ltx-2.3"].transformer_config)
    if not with_metadata:  # the LTX-2.3 transformer never uses it; without a config it is Gemma 3 12B's width
        expected["caption_channels"] = 3840
    assert {k: info.transformer_config[k] for k in expected} == expected  # heads from the gate shapes
    _same(_transformer_outputs(load_transformer(path, torch.float32), "2.3"), _expected(bundle23, "transformer"))
    with pytest.raises(WeightsError, match="no text_embedding_projection"):
        load_connectors(path)
    assert "connectors    not checked: the text projection is not in this file" in check_weights(path)
    with pytest.raises(WeightsError, match=r"t\.safetensors: holds no video_vae"):
        load_video_vae(path)


def test_ltx2_version_and_heads_inferred_without_metadata(tmp_path):
    # Without gates, the head count comes from LTX-2's head sizes (128 video, 64 audio).
    config = {**TARGETS["tiny-ltx-2"].transformer_config, "num_attention_heads": 1, "attention_head_dim": 128,
              "cross_attention_dim": 128, "audio_num_attention_heads": 1, "audio_attention_head_dim": 64,
              "audio_cross_attention_dim": 64, "num_layers": 1}
    torch.manual_seed(0)
    source = _randomize(LTX2VideoTransformer3DModel.from_config(config), 9)
    state = {_original_transformer_key(k): v.contiguous() for k, v in source.state_dict().items()}
    path = _write(tmp_path / "ltx2.safetensors", state)
    info = detect_checkpoint(path)
    assert info.version == "2.0"
    assert {k: info.transformer_config[k] for k in config} == config
    loaded = load_transformer(path, torch.float32)
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("name", ["ltx-2", "ltx-2.3"])
def test_production_shapes_give_the_production_architecture_without_metadata(name):
    # Full-size shapes from a meta-device model: the heads of LTX-2 (no gates) come from its 128 / 64 head sizes.
    with init_empty_weights():
        model = LTX2VideoTransformer3DModel.from_config(TARGETS[name].transformer_config)
    keys = {_original_transformer_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = {new: keys[old] for new, old in convert_transformer_keys(keys).items()}
    version, config = _transformer_config("prod.safetensors", shapes, {})
    assert version == TARGETS[name].version
    assert {k: config[k] for k in TARGETS[name].transformer_config} == TARGETS[name].transformer_config


def test_diffusers_folder_with_sharded_transformer(bundle, tmp_path):
    folders = {"transformer": "transformer", "connectors": "connectors", "video_vae": "vae", "audio_vae": "audio_vae",
               "vocoder": "vocoder"}
    for component, folder in folders.items():
        bundle[component].save_pretrained(tmp_path / folder, max_shard_size="100KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    info = detect_checkpoint(tmp_path)
    assert (info.layout, info.version) == ("diffusers-dir", bundle["version"])
    assert info.components == ["transformer", "connectors", "text_projection", "video_vae", "audio_vae", "vocoder"]
    _assert_loads_every_component(tmp_path, bundle)


def _quantize(tensor):
    scale = tensor.abs().max().float() / torch.finfo(torch.float8_e4m3fn).max
    quantized = (tensor / scale).to(torch.float8_e4m3fn)
    return quantized, scale.reshape(()), quantized.float() * scale


@pytest.mark.parametrize("layout", ["lightricks", "comfy-legacy", "diffusers-dir"])
def test_fp8_scaled_weights_are_dequantized(bundle23, tmp_path, layout):
    reference = {k: v.clone() for k, v in bundle23["transformer"].state_dict().items()}
    # a diffusers folder keeps diffusers names (and the `weight_scale` / `input_scale` companions of the fp8 releases)
    key_of = (lambda name: name) if layout == "diffusers-dir" else _original_transformer_key
    names = {key_of(k): k for k in reference}
    state = {key_of(k): v.contiguous() for k, v in reference.items()}
    for key in [k for k in state if "transformer_blocks." in k and k.endswith(".weight") and state[k].ndim == 2]:
        original = state[key]
        state[key], scale, reference[names[key]] = _quantize(original)
        # e4m3 keeps 3 mantissa bits: within 2^-4 relative, or 2^-9 of the scale near zero
        torch.testing.assert_close(reference[names[key]], original, rtol=2**-4, atol=float(scale) * 2**-9)
        layer = key.removesuffix(".weight")
        if layout != "comfy-legacy":
            state[layer + ".weight_scale"], state[layer + ".input_scale"] = scale, torch.tensor(1.0)
        else:
            state[layer + ".scale_weight"], state[layer + ".scale_input"] = scale, torch.tensor(1.0)
    if layout == "comfy-legacy":
        state[P + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    if layout == "diffusers-dir":
        path = _write_diffusers_transformer(tmp_path, bundle23, state)
    else:
        path = _write(tmp_path / "fp8.safetensors", state, _metadata("2.3"))
    info = detect_checkpoint(path)
    assert info.fp8 and info.dtype_counts["transformer"]["F8_E4M3"] > 0
    model = load_transformer(path, torch.float32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    dequantized = LTX2VideoTransformer3DModel.from_config(bundle23["transformer"].config)
    dequantized.load_state_dict(reference)
    _same(_transformer_outputs(model, "2.3"), _transformer_outputs(dequantized.eval(), "2.3"))


def test_check_weights_reports_every_component(bundle23, tmp_path):
    path = _write(tmp_path / "ltx.safetensors", _original_state(bundle23), _metadata("2.3"))
    report = check_weights(path)
    assert str(path) in report and "single-file" in report and "ltx-2 2.3" in report
    for component, cls in (("transformer", "LTX2VideoTransformer3DModel"), ("connectors", "LTX2TextConnectors"),
                           ("video_vae", "AutoencoderKLLTX2Video"), ("audio_vae", "AutoencoderKLLTX2Audio"),
                           ("vocoder", "LTX2VocoderWithBWE")):
        assert re.search(rf"{component}\s+{cls}", report), report
    assert "every tensor read and accounted for" in report


def test_loading_reads_each_transformer_tensor_once_through_safe_open(bundle23, tmp_path, monkeypatch):
    state = _original_state(bundle23)
    path = _write(tmp_path / "ltx.safetensors", state, _metadata("2.3"))
    reads = []
    real_open = loading.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, key):
            reads.append(key)
            return self.handle.get_tensor(key)

    def refuse(*args, **kwargs):
        raise AssertionError("a whole file was read into memory")

    monkeypatch.setattr(loading, "safe_open", Spy)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    load_transformer(path, torch.float32)
    connectors = (P + "video_embeddings_connector.", P + "audio_embeddings_connector.")
    assert sorted(reads) == sorted(k for k in state if k.startswith(P) and not k.startswith(connectors))


# ---------------------------------------------------------------------------------------------------------------
# Refusals: every message names the file and the problem
# ---------------------------------------------------------------------------------------------------------------


def _bad(tmp_path, bundle23, case):
    state = _original_state(bundle23)
    metadata = _metadata("2.3")
    if case.startswith("pickle"):
        path = tmp_path / f"model.{case.split('-')[1]}"
        path.write_bytes(b"\x80\x04 not to be unpickled")
        return path
    if case.startswith("truncated"):
        path = _write(tmp_path / "model.safetensors", state, metadata)
        data = path.read_bytes()
        path.write_bytes(data[:-1000] if case == "truncated-data" else data[:100])
        return path
    if case == "garbage":
        path = tmp_path / "model.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(64))
        return path
    if case == "lora":
        return _write(tmp_path / "model.safetensors", {
            "diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 32),
            "diffusion_model.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4)})
    if case == "ltx-video":
        return _write(tmp_path / "model.safetensors", {
            P + "patchify_proj.weight": torch.zeros(32, 128),
            P + "transformer_blocks.0.scale_shift_table": torch.zeros(6, 32),
            P + "adaln_single.linear.weight": torch.zeros(192, 32),
            "vae.encoder.conv_in.conv.weight": torch.zeros(1)})
    if case == "ltx-2.5-config":
        return _write(tmp_path / "model.safetensors", state, _metadata("2.3", transformer={"ff_bias": False}))
    if case == "ltx-2.5-tensor":
        state[P + "keyframes_abs_pos_embedding"] = torch.zeros(1, 32)
        return _write(tmp_path / "model.safetensors", state)
    if case == "diffusers-file":
        diffusers_names = {k: v.contiguous() for k, v in bundle23["transformer"].state_dict().items()}
        return _write(tmp_path / "model.safetensors", diffusers_names)
    if case == "int8":
        state[P + "transformer_blocks.0.attn1.to_q.weight"] = torch.zeros(32, 32, dtype=torch.uint8)
        return _write(tmp_path / "model.safetensors", state, metadata)
    if case == "other-family":
        return _write(tmp_path / "model.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)})
    if case == "layers":
        return _write(tmp_path / "model.safetensors", state, _metadata("2.3", transformer={"num_layers": 3}))
    if case == "hidden-size":
        return _write(tmp_path / "model.safetensors", state, _metadata("2.3", transformer={"attention_head_dim": 20}))
    if case == "version":
        return _write(tmp_path / "model.safetensors", state, {**metadata, "model_version": "2.0.0"})
    if case == "missing-tensor":
        del state[P + "transformer_blocks.1.attn2.to_v.bias"]
        return _write(tmp_path / "model.safetensors", state, metadata)
    if case == "extra-tensor":
        state[P + "transformer_blocks.0.attn1.to_r.weight"] = torch.zeros(2, 2)
        return _write(tmp_path / "model.safetensors", state, metadata)
    if case == "no-path":
        return tmp_path / "nowhere.safetensors"
    if case in ("lora-folder", "int8-folder"):  # a diffusers folder gets the same refusals as a single file
        diffusers_state = {k: v.contiguous() for k, v in bundle23["transformer"].state_dict().items()}
        if case == "lora-folder":
            diffusers_state["transformer_blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(4, 32)
        else:
            diffusers_state["transformer_blocks.0.attn1.to_q.weight"] = torch.zeros(32, 32, dtype=torch.uint8)
        return _write_diffusers_transformer(tmp_path / "pipeline", bundle23, diffusers_state)
    if case.startswith("header-"):
        entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
        header = {
            "header-offsets": {P + "patchify_proj.weight": {**entry, "data_offsets": ["0", 16]}},
            "header-dtype": {P + "patchify_proj.weight": {**entry, "dtype": 7}},
            "header-shape": {P + "patchify_proj.weight": {**entry, "shape": [2, "2"]}},
            "header-entry": {P + "patchify_proj.weight": [0, 16]},
            "header-metadata": {"__metadata__": {"config": {"transformer": {}}}, P + "patchify_proj.weight": entry},
        }[case]
        return _write_raw_safetensors(tmp_path / "model.safetensors", header)
    if case == "audio-vae-model":
        return _write(tmp_path / "model.safetensors", state, _metadata("2.3", audio_vae={"model": "oops"}))
    if case == "audio-vae-preprocessing":
        return _write(tmp_path / "model.safetensors", state, _metadata("2.3", audio_vae={"preprocessing": ["stft"]}))
    if case == "vae-encoder-width":
        return _write(tmp_path / "model.safetensors", state, _metadata("2.3", vae={"encoder_base_channels": 16}))
    raise AssertionError(case)


REFUSALS = {
    "pickle-ckpt": r"model\.ckpt: a pickled PyTorch file .*never opened.*Convert it to safetensors",
    "pickle-pt": r"model\.pt: a pickled PyTorch file .*never opened.*Convert it to safetensors",
    "pickle-bin": r"model\.bin: a pickled PyTorch file .*never opened.*Convert it to safetensors",
    "truncated-data": r"model\.safetensors: truncated or corrupt: tensor '.*' should sit at data bytes \d+\.\.\d+ but "
                      r"the file holds \d+ data bytes",
    "truncated-header": r"model\.safetensors: truncated or not a safetensors file: its first 8 bytes announce a "
                        r"\d+-byte header but the file has 100 bytes",
    "garbage": r"model\.safetensors: not a safetensors file: its header is not JSON",
    "lora": r"model\.safetensors: this is a LoRA, not a base model",
    "ltx-video": r"model\.safetensors: an LTX-Video \(0\.9\.x\) checkpoint \(a video-only transformer.*not supported",
    "ltx-2.5-config": r"model\.safetensors: an LTX-2\.5 checkpoint \(config ff_bias=False\); LTX-2\.5 is not supported",
    "ltx-2.5-tensor": r"model\.safetensors: an LTX-2\.5 checkpoint \(tensor keyframes_abs_pos_embedding\)",
    "diffusers-file": r"model\.safetensors: diffusers-format transformer weights; pass the diffusers pipeline folder",
    "int8": r"model\.safetensors: transformer weights stored as U8 .*not supported",
    "other-family": r"model\.safetensors: not an LTX-2 checkpoint: no 'model\.diffusion_model\.' keys",
    "layers": r"model\.safetensors: the checkpoint contradicts itself: its config says num_layers=3 but its tensors "
              r"say num_layers=2",
    "hidden-size": r"model\.safetensors: the checkpoint contradicts itself: its config says attention_head_dim=20 but "
                   r"its tensors say attention_head_dim=16",
    "version": r"model\.safetensors: the checkpoint contradicts itself: its metadata says model_version=2\.0\.0",
    "missing-tensor": r"model\.safetensors: the transformer tensors do not match LTX2VideoTransformer3DModel: "
                      r"1 missing \(transformer_blocks\.1\.attn2\.to_v\.bias\)",
    "extra-tensor": r"model\.safetensors: .* 1 not in the model \(transformer_blocks\.0\.attn1\.to_r\.weight",
    "no-path": r"nowhere\.safetensors: no such file or folder",
    "lora-folder": r"pipeline/transformer/diffusion_pytorch_model\.safetensors: this is a LoRA, not a base model "
                   r"\(found 'transformer_blocks\.0\.attn1\.to_q\.lora_A\.weight'\)",
    "int8-folder": r"pipeline/transformer/diffusion_pytorch_model\.safetensors: transformer weights stored as U8 "
                   r"\(transformer_blocks\.0\.attn1\.to_q\.weight\): int8 / nvfp4 .*not supported",
    "header-offsets": r"model\.safetensors: not a safetensors file: header entry 'model\.diffusion_model\."
                      r"patchify_proj\.weight' has data_offsets \['0', 16\]; expected two non-negative integers",
    "header-dtype": r"model\.safetensors: not a safetensors file: header entry '.*patchify_proj\.weight' has dtype 7; "
                    r"expected a string",
    "header-shape": r"model\.safetensors: not a safetensors file: header entry '.*patchify_proj\.weight' has shape "
                    r"\[2, '2'\]; expected a list of non-negative integers",
    "header-entry": r"model\.safetensors: not a safetensors file: header entry '.*patchify_proj\.weight' is \[0, 16\]; "
                    r"expected a JSON object with dtype, shape and data_offsets",
    "header-metadata": r"model\.safetensors: not a safetensors file: its header __metadata__ is .*; expected a JSON "
                       r"object of strings",
    "audio-vae-model": r"model\.safetensors: metadata audio_vae\.model is 'oops'; expected a JSON object",
    "audio-vae-preprocessing": r"model\.safetensors: metadata audio_vae\.preprocessing is \['stft'\]; expected a "
                               r"JSON object",
    "vae-encoder-width": r"model\.safetensors: metadata vae\.encoder_base_channels=16 differs from latent_channels=8; "
                         r".*only encoder_base_channels equal to latent_channels .* is supported",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_checkpoints_are_refused_with_a_clear_message(bundle23, tmp_path, case):
    path = _bad(tmp_path, bundle23, case)
    with pytest.raises(WeightsError, match=REFUSALS[case]):
        check_weights(path)


def test_diffusers_folder_of_another_family_is_refused(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "LTXVideoTransformer3DModel"}))
    with pytest.raises(WeightsError, match=r"transformer/config\.json: _class_name 'LTXVideoTransformer3DModel' is not "
                                           r"an LTX-2 transformer .*not supported"):
        detect_checkpoint(tmp_path)
    with pytest.raises(WeightsError, match=r"not a diffusers LTX-2 pipeline: there is no transformer/config\.json"):
        detect_checkpoint(tmp_path / "transformer")


def test_head_count_messages_name_the_stream():
    # LTX-2 shapes (caption projection, no gates): the heads come from the 128 / 64 head sizes or the config.
    shapes = {"proj_in.weight": (128, 128), "audio_proj_in.weight": (64, 128),
              "caption_projection.linear_1.weight": (128, 24)}
    with pytest.raises(WeightsError, match=r"t\.safetensors: cannot tell the audio attention heads: the audio width 48 "
                                           r"is no multiple of LTX-2's head size 64, .*declares no "
                                           r"audio_num_attention_heads"):
        _transformer_config("t.safetensors", {**shapes, "audio_proj_in.weight": (48, 128)}, {})
    with pytest.raises(WeightsError, match=r"cannot tell the video attention heads: the video width 100 "):
        _transformer_config("t.safetensors", {**shapes, "proj_in.weight": (100, 128)}, {})
    declared = {"audio_num_attention_heads": ("audio_num_attention_heads", 5)}
    with pytest.raises(WeightsError, match=r"t\.safetensors: the audio width 64 does not split into 5 heads"):
        _transformer_config("t.safetensors", shapes, declared)
    declared = {"num_attention_heads": ("num_attention_heads", 0)}
    with pytest.raises(WeightsError, match=r"its config says num_attention_heads=0; expected a positive integer"):
        _transformer_config("t.safetensors", shapes, declared)


def test_connector_head_count_messages_say_what_is_wrong():
    # No gates, no declared head count and a width below LTX-2's head size 128: nothing tells the heads.
    for stream, also in (("video", ""), ("audio", r" \(or connector_num_attention_heads\)")):
        shapes = {f"{stream}_connector.transformer_blocks.0.attn1.to_q.weight": (64, 64)}
        with pytest.raises(WeightsError, match=rf"c\.safetensors: cannot tell the {stream} connector's attention "
                                               rf"heads: its width 64 is no multiple of LTX-2's head size 128, its "
                                               rf"blocks have no per-head gates and the checkpoint declares no "
                                               rf"{'audio_' if stream == 'audio' else ''}connector_num_attention_heads"
                                               rf"{also}$"):
            _connector_stack("c.safetensors", stream, shapes, {})
    shapes = {"video_connector.transformer_blocks.0.attn1.to_q.weight": (64, 64)}
    with pytest.raises(WeightsError, match=r"its config says connector_num_attention_heads=0 for the video "
                                           r"connector; expected a positive integer"):
        _connector_stack("c.safetensors", "video", shapes, {"connector_num_attention_heads": 0})
    with pytest.raises(WeightsError, match=r"the video connector width 64 does not split into 3 heads"):
        _connector_stack("c.safetensors", "video", shapes, {"connector_num_attention_heads": 3})


def test_check_weights_on_a_folder_without_text_projection_says_so(bundle23, tmp_path):
    bundle23["transformer"].save_pretrained(tmp_path / "transformer")
    bundle23["connectors"].save_config(tmp_path / "connectors")
    state = {k: v.contiguous() for k, v in bundle23["connectors"].state_dict().items() if "text_proj_in." not in k}
    save_file(state, str(tmp_path / "connectors" / "diffusion_pytorch_model.safetensors"))
    report = check_weights(tmp_path)
    assert "connectors    not checked: the connectors folder holds no text projection" in report, report
    assert "ComfyUI" not in report and "this file" not in report
