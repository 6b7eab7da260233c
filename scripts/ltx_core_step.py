"""Baseline for scripts/bench_step.py: the same LoRA training step on the official implementation, timed in the same run.

Lightricks' own transformer, `LTXModel` of ltx-core (the model the official ltx-trainer trains), built at the
architecture of our `trainer.models.registry` target with random bf16 weights, the same LoRA (PEFT, rank 32, fp32
adapters, the Linears bench_step's LORA_TARGETS select, by the same regex), the same inputs (GRIDS, audio and text
tokens of bench_step) and fused AdamW, run the way the official trainer runs it: `Modality` inputs with positions from
ltx-core's own patchifiers, `set_gradient_checkpointing(True)` (every block, non-reentrant `torch.utils.checkpoint`),
bf16 autocast, no perturbations. Attention is ltx-core's PyTorch SDPA path; the caller chooses the SDPA backend.

Used only by the benchmark. ltx-core is not a project dependency (its licence is not open: this file imports and
calls it, nothing of it is copied). It needs two wheels besides the project's requirements, installed without
dependencies because ltx-core pins torch~=2.7:

    pip install --no-deps ltx-core==1.0.0 einops

(the transformer imports only torch, numpy, einops and safetensors; scipy, torchaudio and transformers serve other
parts of ltx-core). Self-test on the CPU at tiny sizes:

    python scripts/ltx_core_step.py --cpu-check
"""

from __future__ import annotations

import argparse
import torch

# Fixed fields of the transformer section of the public checkpoints' embedded config (LTX-2 and LTX-2.3 alike),
# those `LTXModelConfigurator` checks; widths and switches come from our registry (`ltx_core_config`).
_PUBLIC_FIELDS = {
    "dropout": 0.0, "attention_bias": True, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
    "use_linear_projection": False, "only_cross_attention": False, "cross_attention_norm": True,
    "double_self_attention": False, "upcast_attention": False, "standardization_norm": "rms_norm",
    "norm_elementwise_affine": False, "qk_norm": "rms_norm", "positional_embedding_type": "rope",
    "use_audio_video_cross_attention": True, "share_ff": False, "av_cross_ada_norm": True,
    "use_middle_indices_grid": True,
    "attention_type": "pytorch",  # SDPA ("default" would take xformers where it is installed)
}
SIGMAS = (0.7, 0.4)  # video, audio
FPS = 24.0


def _bench():
    try:
        import bench_step  # run from scripts/ (python scripts/bench_step.py puts scripts/ on the path)
    except ImportError:
        from scripts import bench_step
    return bench_step


def ltx_core_config(target_name: str, num_layers: int | None = None) -> dict:
    """ltx-core's `{"transformer": ...}` config of a registry target, in the public checkpoints' field names."""
    from trainer.models.registry import TARGETS

    cfg = TARGETS[target_name].transformer_config
    assert cfg["gated_attn"] == cfg["audio_gated_attn"] and cfg["cross_attn_mod"] == cfg["audio_cross_attn_mod"]
    same = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "cross_attention_dim",
            "audio_num_attention_heads", "audio_attention_head_dim", "audio_in_channels", "audio_out_channels",
            "audio_cross_attention_dim", "caption_channels", "norm_eps", "rope_type", "timestep_scale_multiplier")
    return {"transformer": {
        **_PUBLIC_FIELDS, **{key: cfg[key] for key in same},
        "num_layers": num_layers or cfg["num_layers"],
        "positional_embedding_theta": cfg["rope_theta"],
        "positional_embedding_max_pos": [cfg["pos_embed_max_pos"], cfg["base_height"], cfg["base_width"]],
        "audio_positional_embedding_max_pos": [cfg["audio_pos_embed_max_pos"]],
        "av_ca_timestep_scale_multiplier": cfg["cross_attn_timestep_scale_multiplier"],  # 1000 in the real files
        "frequencies_precision": "float64" if cfg["rope_double_precision"] else "float32",
        "apply_gated_attention": cfg["gated_attn"],
        "cross_attention_adaln": cfg["cross_attn_mod"],
        "caption_proj_before_connector": not cfg["use_prompt_embeddings"],  # False: caption projection inside (LTX-2)
    }}


def build_model(config: dict, device: torch.device) -> torch.nn.Module:
    """LTXModel with seeded random bf16 weights created on `device` (never in fp32 on the host)."""
    from ltx_core.model.transformer import LTXModelConfigurator

    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(device):
            torch.manual_seed(0)
            model = LTXModelConfigurator.from_config(config)
            for module in model.modules():
                own = list(module.parameters(recurse=False))
                if any(p.is_meta for p in own):  # the LTX-2 caption projections are built on the meta device
                    module.to_empty(device=device, recurse=False)
                    module.reset_parameters()
                elif own and not hasattr(module, "reset_parameters"):  # scale-shift tables: torch.empty
                    for p in own:
                        torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    finally:
        torch.set_default_dtype(previous)
    return model


def build_inputs(target_name: str, tokens: int, device: torch.device):
    """(video, audio) `Modality` at bench_step's shapes, and their velocity targets. Positions come from ltx-core's
    patchifiers as the official trainer builds them: video in pixels with the causal first frame, time / fps; audio
    in seconds. Timesteps per token ([1, N], what the official trainer passes; ltx-core also takes [1, 1]). Video
    latents and text embeddings in bf16, audio latents in fp32, as the official trainer feeds them (its audio VAE runs
    in fp32)."""
    from ltx_core.components.patchifiers import AudioPatchifier, VideoLatentPatchifier, get_pixel_coords
    from ltx_core.model.transformer import Modality
    from ltx_core.types import AudioLatentShape, SpatioTemporalScaleFactors, VideoLatentShape
    from trainer.models.registry import TARGETS

    bench, target = _bench(), TARGETS[target_name]
    frames, height, width = bench.GRIDS[tokens]
    g = torch.Generator().manual_seed(0)
    video_grid = VideoLatentPatchifier(patch_size=1).get_patch_grid_bounds(
        VideoLatentShape(batch=1, channels=128, frames=frames, height=height, width=width), device=device)
    video_positions = get_pixel_coords(video_grid, SpatioTemporalScaleFactors.default(), causal_fix=True).float()
    video_positions[:, 0] /= FPS
    audio_positions = AudioPatchifier(patch_size=1).get_patch_grid_bounds(
        AudioLatentShape(batch=1, channels=8, frames=bench.AUDIO_TOKENS, mel_bins=16), device=device)
    mask = torch.ones(1, bench.TEXT_TOKENS, dtype=torch.long, device=device)
    streams, targets = [], []
    for n, sigma, text_dim, dtype, positions in (
        (frames * height * width, SIGMAS[0], target.video_text_dim, torch.bfloat16, video_positions),
        (bench.AUDIO_TOKENS, SIGMAS[1], target.audio_text_dim, torch.float32, audio_positions),
    ):
        x0, noise = torch.randn(2, 1, n, 128, generator=g)
        context = torch.randn(1, bench.TEXT_TOKENS, text_dim, generator=g)
        streams.append(Modality(
            latent=((1 - sigma) * x0 + sigma * noise).to(device, dtype),
            sigma=torch.full((1,), sigma, device=device),
            timesteps=torch.full((1, n), sigma, device=device),
            positions=positions, context=context.to(device, torch.bfloat16), context_mask=mask))
        targets.append((noise - x0).to(device))
    return streams, targets


def build(target_name: str, tokens: int, compiled: bool, device: torch.device, num_layers: int | None = None):
    """(model, LoRA parameters, step) where step() runs one training step and returns the loss, detached."""
    from peft import LoraConfig, inject_adapter_in_model
    from trainer.lora import target_regex

    model = build_model(ltx_core_config(target_name, num_layers), device)
    model.requires_grad_(False)
    with torch.device(device):
        inject_adapter_in_model(LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, init_lora_weights=True,
                                           target_modules=target_regex(_bench().LORA_TARGETS)), model)
    params = [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    model.train()
    model.set_gradient_checkpointing(True)  # ltx-core's own: every block, torch.utils.checkpoint(use_reentrant=False)
    if compiled:
        # All blocks share one code object and its recompile limit (8). torch 2.14 needs 3 entries whatever the depth
        # (block 0's inputs need no grad; a typing.Protocol in ltx-core's attention mutates on first use); a dynamo
        # that specialised on each block's int `idx` would need one per block, and the rest would run eagerly.
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, len(model.transformer_blocks) + 8)
        for block in model.transformer_blocks:
            block.compile()
    (video, audio), (video_target, audio_target) = build_inputs(target_name, tokens, device)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, torch.bfloat16):
            video_pred, audio_pred = model(video, audio, None)
        loss = (torch.nn.functional.mse_loss(video_pred.float(), video_target)
                + torch.nn.functional.mse_loss(audio_pred.float(), audio_target))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return model, params, step


def _cpu_check(compiled: bool) -> None:
    """Both production targets at full width (1 block) and both tiny targets (2 blocks), 24 video tokens, CPU."""
    _bench().GRIDS.setdefault(24, (1, 4, 6))
    device = torch.device("cpu")
    for name, layers in (("tiny-ltx-2.3", None), ("tiny-ltx-2", None), ("ltx-2.3", 1), ("ltx-2", 1)):
        for compile_now in (False, True) if compiled and name.startswith("tiny") else (False,):
            torch._dynamo.reset()
            model, params, step = build(name, 24, compile_now, device, layers)
            b = [p for n, p in model.named_parameters() if ".lora_B." in n]
            losses = [step().item() for _ in range(2)]
            kinds = {}
            for n, _ in model.named_modules():
                if n.endswith(".lora_A.default"):
                    kinds[n.split(".")[2]] = kinds.get(n.split(".")[2], 0) + 1
            changed = sum(bool(p.abs().sum() > 0) for p in b)
            print(f"{name} layers={len(model.transformer_blocks)} compiled={compile_now}: loss {losses[0]:.4f} -> "
                  f"{losses[1]:.4f}, {len(b)} LoRA Linears {kinds}, dtype {params[0].dtype}, "
                  f"lora_B nonzero after steps: {changed}/{len(b)}")
            assert all(torch.isfinite(torch.tensor(losses))) and changed == len(b) and params[0].dtype == torch.float32


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-check", action="store_true", help="run a few steps of small models on the CPU")
    parser.add_argument("--compiled", action="store_true", help="also compile the tiny models' blocks (slow)")
    args = parser.parse_args()
    if args.cpu_check:
        _cpu_check(args.compiled)
        print("ok")
