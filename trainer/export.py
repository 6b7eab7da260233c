"""Turning a trained adapter into files users load: the run's final export and `ltx-lora export`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.config import ConfigError, RunConfig, load_config
from trainer.lora_files import convert_lora_file, save_lora
from trainer.models.registry import get_target
from trainer.modes import MODE_SPECS


def lora_metadata(cfg: RunConfig) -> dict[str, Any]:
    """What a LoRA file records about its training, so a loader can refuse the wrong model. An IC-LoRA also records
    the reference factors under the names the inference pipelines read (diffusers, ComfyUI, ltx-pipelines)."""
    metadata = {
        "model_target": cfg.model.target,
        "model_version": get_target(cfg.model.target).version,
        "targets": cfg.lora_targets,
        "recipe": cfg.recipe or "",
        "mode": cfg.mode,
        "trigger_word": cfg.trigger_word or "",
    }
    if MODE_SPECS[cfg.mode].reference:
        metadata["reference_downscale_factor"] = cfg.data.reference_downscale
        metadata["reference_temporal_scale_factor"] = cfg.data.reference_temporal_scale
    return metadata


def export_run(cfg: RunConfig, adapter: dict[str, torch.Tensor], directory: Path) -> list[Path]:
    """Writes the adapter in every configured format: ComfyUI `<name>.safetensors`, diffusers in `diffusers/`."""
    written = []
    for fmt in cfg.export.formats:
        name = f"{cfg.export.name}.safetensors" if fmt == "comfyui" else "diffusers/pytorch_lora_weights.safetensors"
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_lora(path, adapter, rank=cfg.lora.rank, alpha=cfg.lora_alpha, fmt=fmt, metadata=lora_metadata(cfg))
        written.append(path)
    return written


def export_file(source: Path, output: Path, fmt: str) -> Path:
    """Converts a LoRA file, or exports a checkpoint folder using the run's saved config for its metadata."""
    if not source.exists():
        raise ConfigError(f"{source} does not exist; give a LoRA .safetensors file or a checkpoint folder")
    output.parent.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        convert_lora_file(source, output, fmt)
        return output
    checkpoint = load_checkpoint(source)
    run_config = source.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise CheckpointError(f"{source}: the run's config.yaml ({run_config}) is missing; it names rank and alpha")
    cfg = load_config(run_config)
    save_lora(output, checkpoint.adapter, rank=cfg.lora.rank, alpha=cfg.lora_alpha, fmt=fmt, metadata=lora_metadata(cfg))
    return output
