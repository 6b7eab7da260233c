"""Named model targets: the architecture of each LTX-2 family member we train, and how to build its transformer.

The production entries mirror the published checkpoints (LTX-2 "19B" and LTX-2.3 "22B"); class defaults of
`LTX2VideoTransformer3DModel` are not production values (e.g. its default RoPE is interleaved, production is split).
The `tiny-*` entries keep every flag of their production twin and shrink only depth and widths, so tests and the
smoke run exercise the same code paths on a CPU in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# Architecture shared by both production releases (diffusers config names).
_PRODUCTION_TRUNK: dict[str, Any] = {
    "in_channels": 128,
    "out_channels": 128,
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 32,
    "attention_head_dim": 128,
    "cross_attention_dim": 4096,
    "vae_scale_factors": (8, 32, 32),
    "pos_embed_max_pos": 20,
    "base_height": 2048,
    "base_width": 2048,
    "audio_in_channels": 128,
    "audio_out_channels": 128,
    "audio_patch_size": 1,
    "audio_patch_size_t": 1,
    "audio_num_attention_heads": 32,
    "audio_attention_head_dim": 64,
    "audio_cross_attention_dim": 2048,
    "audio_scale_factor": 4,
    "audio_pos_embed_max_pos": 20,
    "audio_sampling_rate": 16000,
    "audio_hop_length": 160,
    "num_layers": 48,
    "activation_fn": "gelu-approximate",
    "qk_norm": "rms_norm_across_heads",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 3840,
    "attention_bias": True,
    "attention_out_bias": True,
    "rope_theta": 10000.0,
    "rope_double_precision": True,
    "causal_offset": 1,
    "timestep_scale_multiplier": 1000,
    "cross_attn_timestep_scale_multiplier": 1000,
    "rope_type": "split",
}

# LTX-2: caption projection inside the transformer, no gates, no prompt modulation.
_LTX2_FLAGS: dict[str, Any] = {
    "gated_attn": False,
    "cross_attn_mod": False,
    "audio_gated_attn": False,
    "audio_cross_attn_mod": False,
    "use_prompt_embeddings": True,
    "perturbed_attn": False,
}

# LTX-2.3: per-head output gates, prompt (cross-attention) modulation, text projected by the connectors.
_LTX23_FLAGS: dict[str, Any] = {
    "gated_attn": True,
    "cross_attn_mod": True,
    "audio_gated_attn": True,
    "audio_cross_attn_mod": True,
    "use_prompt_embeddings": False,
    "perturbed_attn": True,
}

# Small widths for tests and the smoke run. Channel counts of the latents stay at production size (128), so cached
# latents have the same shapes whichever target reads them.
_TINY_TRUNK: dict[str, Any] = {
    **_PRODUCTION_TRUNK,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "cross_attention_dim": 32,
    "audio_num_attention_heads": 2,
    "audio_attention_head_dim": 8,
    "audio_cross_attention_dim": 16,
    "caption_channels": 24,
    "num_layers": 2,
}


@dataclass(frozen=True)
class ModelTarget:
    """One trainable model: its name, version family and diffusers transformer config."""

    name: str
    version: str  # "2.3" or "2.0": LoRAs are not interchangeable between versions
    transformer_config: dict[str, Any] = field(repr=False)
    tiny: bool = False

    @property
    def video_text_dim(self) -> int:
        """Width of the video text embeddings the transformer takes as `encoder_hidden_states`."""
        cfg = self.transformer_config
        return cfg["caption_channels"] if cfg["use_prompt_embeddings"] else cfg["cross_attention_dim"]

    @property
    def audio_text_dim(self) -> int:
        """Width of the audio text embeddings the transformer takes as `audio_encoder_hidden_states`."""
        cfg = self.transformer_config
        return cfg["caption_channels"] if cfg["use_prompt_embeddings"] else cfg["audio_cross_attention_dim"]

    @property
    def video_channels(self) -> int:
        return self.transformer_config["in_channels"]

    @property
    def audio_channels(self) -> int:
        return self.transformer_config["audio_in_channels"]


TARGETS: dict[str, ModelTarget] = {
    "ltx-2.3": ModelTarget("ltx-2.3", "2.3", {**_PRODUCTION_TRUNK, **_LTX23_FLAGS}),
    "ltx-2": ModelTarget("ltx-2", "2.0", {**_PRODUCTION_TRUNK, **_LTX2_FLAGS}),
    "tiny-ltx-2.3": ModelTarget("tiny-ltx-2.3", "2.3", {**_TINY_TRUNK, **_LTX23_FLAGS}, tiny=True),
    "tiny-ltx-2": ModelTarget("tiny-ltx-2", "2.0", {**_TINY_TRUNK, **_LTX2_FLAGS}, tiny=True),
}


def get_target(name: str) -> ModelTarget:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown model target {name!r}; known targets: {', '.join(TARGETS)}") from None


def build_random_transformer(
    target: ModelTarget, seed: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
):
    """The target's transformer with seeded random weights: tiny targets for tests, full size for benchmarks.

    Parameters are created directly in `dtype` on `device`: a full-size model never exists in fp32 on the host.
    """
    from diffusers import LTX2VideoTransformer3DModel

    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            return LTX2VideoTransformer3DModel.from_config(target.transformer_config)
    finally:
        torch.set_default_dtype(previous)


def check_checkpoint(target: ModelTarget, checkpoint: str):
    """Reads only the checkpoint's headers, so a wrong file fails before anything heavy is loaded."""
    from trainer.models.loading import WeightsError, detect_checkpoint

    info = detect_checkpoint(checkpoint)
    if info.version != target.version:
        right = next(name for name, t in TARGETS.items() if t.version == info.version and t.tiny == target.tiny)
        raise WeightsError(
            f"{checkpoint}: an LTX-{info.version} checkpoint, but model.target = {target.name!r} is LTX-{target.version}; "
            f"set model.target = {right!r} (LoRAs of one version do not work on the other)"
        )
    return info


def build_transformer(
    target: ModelTarget, checkpoint: str | None, seed: int, dtype: torch.dtype, device: str | torch.device = "cpu"
):
    """The loading seam: the public weights when a checkpoint is given (architecture read from the file), else
    seeded random weights (tiny targets; the config refuses production targets without a checkpoint). Those are drawn
    on the CPU and then moved, so that every device gets the same weights (a GPU's random stream differs from the
    CPU's): an FSDP run, which builds on the CPU, then starts from the model a one-GPU run starts from."""
    if checkpoint is None:
        return build_random_transformer(target, seed, dtype).to(device)
    from trainer.models.loading import load_transformer

    return load_transformer(checkpoint, dtype, device)
