"""Reading LTX-2 and LTX-2.3 base checkpoints: what a path holds, how its keys map to diffusers, and loading it.

Three layouts are read:
- single-file: the Lightricks release, every component in one safetensors file under its original key names, the
  architecture in the `config` metadata (JSON sections `transformer`, `vae`, `audio_vae`, `vocoder`);
- transformer-only: the same `model.diffusion_model.` keys as ComfyUI users keep them, with or without metadata;
- diffusers-dir: a diffusers pipeline folder, one subfolder (config.json + safetensors) per component.

Dimensions always come from the tensor shapes and are checked against whatever config the checkpoint declares. A
setting no tensor shows (RoPE layout, timestep multipliers, ...) comes from the checkpoint's config; where a
transformer-only file has none, from the values every published LTX-2 / LTX-2.3 checkpoint declares — never from a
diffusers class default (those are not production values). Inside the `vae`, `audio_vae` and `vocoder` metadata
sections a missing key means what Lightricks' own loader (ltx-core) takes it to mean.

Loading builds the model on the meta device and then reads one tensor at a time through memory-mapped `safe_open`,
casting each once to the target dtype and device, so it never holds a second copy of the weights.

The pieces sit beside this module: `safetensors_files` reads headers and folders, `transformer_keys` and
`component_keys` map each component's names and infer its config; this module detects, plans, builds and checks.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open

# WeightsError, TensorEntry and convert_transformer_keys are imported from here too: they are this module's API.
from trainer.models.component_keys import (
    _UNUSED_VAE_STATISTICS,
    _VAE_STATISTICS,
    _audio_vae_config,
    _connector_name,
    _connectors_config,
    _video_vae_config,
    _video_vae_name,
    _vocoder_config,
    _vocoder_name,
    _vocoder_with_bwe_config,
)
from trainer.models.safetensors_files import (
    _INTEGER_WEIGHT_DTYPES,
    _PICKLE_SUFFIXES,
    _UNUSED_QUANT_SUFFIXES,
    TensorEntry,
    WeightsError,
    _is_quant_companion,
    _listing,
    _metadata_config,
    _read_folder,
    _read_header,
    _read_json,
    _scale_of,
)
from trainer.models.transformer_keys import (
    _CONNECTOR_PREFIXES,
    TRANSFORMER_PREFIX,
    _declared_from_metadata,
    _transformer_config,
    convert_transformer_keys,
)

FAMILY = "ltx-2"
# Single-file key prefix -> component, tried in order (the connectors sit inside the transformer's prefix).
_SINGLE_FILE_PREFIXES = (
    (_CONNECTOR_PREFIXES[0], "connectors"),
    (_CONNECTOR_PREFIXES[1], "connectors"),
    (TRANSFORMER_PREFIX, "transformer"),
    ("text_embedding_projection.", "text_projection"),
    ("vae.", "video_vae"),
    ("audio_vae.", "audio_vae"),
    ("vocoder.", "vocoder"),
)
# Component -> subfolder and accepted `_class_name`s of a diffusers pipeline folder.
_DIFFUSERS_FOLDERS = {
    "transformer": ("transformer", ("LTX2VideoTransformer3DModel",)),
    "connectors": ("connectors", ("LTX2TextConnectors",)),
    "video_vae": ("vae", ("AutoencoderKLLTX2Video",)),
    "audio_vae": ("audio_vae", ("AutoencoderKLLTX2Audio",)),
    "vocoder": ("vocoder", ("LTX2Vocoder", "LTX2VocoderWithBWE")),
}
_DIFFUSERS_TEXT_PROJECTIONS = ("text_proj_in.", "video_text_proj_in.", "audio_text_proj_in.")
_LORA_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up")


@dataclass
class CheckpointInfo:
    """What a checkpoint path holds: layout, model version, the transformer architecture and its components."""

    path: Path
    layout: str  # "single-file" | "transformer-only" | "diffusers-dir"
    family: str  # "ltx-2"
    version: str  # "2.3" | "2.0"
    transformer_config: dict[str, Any]  # diffusers `LTX2VideoTransformer3DModel` config
    components: list[str]  # of: transformer, connectors, text_projection, video_vae, audio_vae, vocoder
    dtype_counts: dict[str, dict[str, int]]  # component -> safetensors dtype -> number of tensors
    param_counts: dict[str, int]  # component -> number of weights stored (quantization scales not counted)
    fp8: bool  # transformer weights stored as fp8 (dequantized on load)
    # The checkpoint's own configs: the metadata `config` sections, or each diffusers subfolder's config.json.
    source_config: dict[str, Any] = field(default_factory=dict, repr=False)
    # component -> key -> tensor, for every tensor the checkpoint holds.
    tensors: dict[str, dict[str, TensorEntry]] = field(default_factory=dict, repr=False)


@dataclass
class _Plan:
    """One component to build: its class and config, and where each of its tensors comes from."""

    where: str  # the file or folder, for messages
    component: str
    cls: type
    config: dict[str, Any]
    sources: dict[str, TensorEntry]  # model state-dict name -> tensor in the checkpoint
    pool: dict[str, TensorEntry]  # every tensor of the component: scale companions are found here, strays reported
    ignored: set[str] = field(default_factory=set)  # keys of the component the model does not use, by design


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def detect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Reads a checkpoint's headers (no tensor data) and says what it is; refuses anything this trainer cannot use."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder; expected a .safetensors checkpoint or a diffusers folder")
    if path.is_dir():
        return _detect_diffusers_dir(path)
    return _detect_file(path)


def load_transformer(path: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """The checkpoint's `LTX2VideoTransformer3DModel`, every tensor read once, cast to `dtype` on `device`."""
    return _build(_plan(detect_checkpoint(path), "transformer"), dtype, device)


def load_connectors(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The text connectors with their text-embedding projection, as diffusers' `LTX2TextConnectors`."""
    return _build(_plan(detect_checkpoint(path), "connectors"), dtype, device)


def load_video_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The video VAE (`AutoencoderKLLTX2Video`) with the checkpoint's per-channel latent statistics."""
    return _build(_plan(detect_checkpoint(path), "video_vae"), dtype, device)


def load_audio_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The audio VAE (`AutoencoderKLLTX2Audio`); keep it in float32, as the reference pipeline runs it."""
    return _build(_plan(detect_checkpoint(path), "audio_vae"), dtype, device)


def load_vocoder(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The vocoder: `LTX2Vocoder` (LTX-2) or `LTX2VocoderWithBWE` (LTX-2.3, with bandwidth extension)."""
    return _build(_plan(detect_checkpoint(path), "vocoder"), dtype, device)


def check_weights(path: str | Path) -> str:
    """Reads every tensor of every component the path holds, without keeping them, and reports what it found.

    Each component is matched tensor for tensor against its model built on the meta device, then its tensors are read
    (and dequantized) one at a time, so a 40 GB checkpoint needs no more memory than its largest tensor. Raises
    WeightsError on any problem."""
    info = detect_checkpoint(path)
    lines = [
        f"{info.path}",
        f"  layout: {info.layout}",
        f"  model: {info.family} {info.version}" + (" (fp8 scaled weights, dequantized on load)" if info.fp8 else ""),
    ]
    for component in ("transformer", "connectors", "video_vae", "audio_vae", "vocoder"):
        if component not in info.components:
            continue
        if component == "connectors" and "text_projection" not in info.components:
            if info.layout == "diffusers-dir":
                why = ("the connectors folder holds no text projection (text_proj_in.* or video_text_proj_in.* and "
                       "audio_text_proj_in.*), which LTX2TextConnectors needs")
            else:
                why = "the text projection is not in this file (ComfyUI keeps it with the text encoder)"
            lines.append(f"  connectors    not checked: {why}")
            continue
        plan = _plan(info, component)
        parameters = _verify(plan)
        stored = Counter(entry.dtype for entry in plan.pool.values())
        dtypes = ", ".join(f"{count} {dtype}" for dtype, count in sorted(stored.items()))
        lines.append(f"  {component:<13} {plan.cls.__name__:<28} {_human(parameters):>7} parameters  ({dtypes})")
    lines.append("  every tensor read and accounted for")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------------


def _detect_file(path: Path) -> CheckpointInfo:
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise WeightsError(
            f"{path}: a pickled PyTorch file ({path.suffix}); pickles are never opened here because unpickling can "
            "run arbitrary code. Convert it to safetensors (or download the .safetensors release)"
        )
    metadata, entries = _read_header(path)
    _refuse_lora(entries)
    source_config = _metadata_config(path, metadata)
    _refuse_other_families(path, entries, metadata, source_config)

    tensors: dict[str, dict[str, TensorEntry]] = {}
    unknown = []
    for key, entry in entries.items():
        component = next((c for prefix, c in _SINGLE_FILE_PREFIXES if key.startswith(prefix)), None)
        if component is None:
            unknown.append(key)
        else:
            tensors.setdefault(component, {})[key] = entry
    if unknown:
        raise WeightsError(f"{path}: {_listing('keys that belong to no LTX-2 component', sorted(unknown))}")

    if "transformer" not in tensors:
        raise WeightsError(f"{path}: holds no LTX-2 transformer, only {', '.join(sorted(tensors))}")
    transformer = tensors["transformer"]
    _refuse_integer_weights(transformer)
    shapes = {name: transformer[key].shape for name, key in convert_transformer_keys(transformer).items()}
    declared = _declared_from_metadata(path, source_config.get("transformer", {}))
    version, config = _transformer_config(str(path), shapes, declared)
    _check_model_version(path, metadata, version)
    has_autoencoders = any(c in tensors for c in ("video_vae", "audio_vae", "vocoder"))
    return _info(path, "single-file" if has_autoencoders else "transformer-only", version, config, tensors,
                 source_config)


def _detect_diffusers_dir(root: Path) -> CheckpointInfo:
    if not (root / "transformer" / "config.json").is_file():
        raise WeightsError(
            f"{root}: a folder but not a diffusers LTX-2 pipeline: there is no transformer/config.json (expected "
            "subfolders transformer, connectors, vae, audio_vae, vocoder, each with config.json and safetensors)"
        )
    source_config: dict[str, Any] = {}
    tensors: dict[str, dict[str, TensorEntry]] = {}
    for component, (folder, classes) in _DIFFUSERS_FOLDERS.items():
        config_file = root / folder / "config.json"
        if not config_file.is_file():
            continue
        config = _read_json(config_file)
        if config.get("_class_name") not in classes:
            raise WeightsError(
                f"{config_file}: _class_name {config.get('_class_name')!r} is not an LTX-2 {component} (expected "
                f"{' or '.join(classes)}); LTX-Video 0.9.x, LTX-2.5 and other families are not supported yet"
            )
        source_config[folder] = config
        entries = _read_folder(root / folder)
        _refuse_lora(entries)
        if component == "connectors":
            projection = {k: e for k, e in entries.items() if k.startswith(_DIFFUSERS_TEXT_PROJECTIONS)}
            entries = {k: e for k, e in entries.items() if k not in projection}
            if projection:
                tensors["text_projection"] = projection
        tensors[component] = entries

    _refuse_integer_weights(tensors["transformer"])
    where = root / "transformer"
    declared = {k: (k, v) for k, v in source_config["transformer"].items() if not k.startswith("_")}
    # as in single files, scaled-fp8 companions are no model tensors (`convert_transformer_keys` leaves them out there)
    shapes = {key: entry.shape for key, entry in tensors["transformer"].items() if not _is_quant_companion(key)}
    version, config = _transformer_config(str(where), shapes, declared)
    return _info(root, "diffusers-dir", version, config, tensors, source_config)


def _refuse_lora(entries: dict[str, TensorEntry]) -> None:
    """Refuses LoRA weights passed as a base model (single file or a diffusers folder's safetensors)."""
    for key, entry in entries.items():
        if any(marker in key for marker in _LORA_MARKERS):
            raise WeightsError(
                f"{entry.file}: this is a LoRA, not a base model (found {key!r}); pass the base checkpoint"
            )


def _refuse_integer_weights(transformer: dict[str, TensorEntry]) -> None:
    """Refuses int8 / nvfp4 transformer weights (integer dtypes); scaled fp8 is dequantized on load instead."""
    for key, entry in transformer.items():
        if entry.dtype in _INTEGER_WEIGHT_DTYPES and not _is_quant_companion(key):
            raise WeightsError(
                f"{entry.file}: transformer weights stored as {entry.dtype} ({key}): int8 / nvfp4 quantized "
                "checkpoints are not supported; use a bf16, fp16, fp32 or scaled-fp8 checkpoint"
            )


def _info(path, layout, version, config, tensors, source_config) -> CheckpointInfo:
    order = ("transformer", "connectors", "text_projection", "video_vae", "audio_vae", "vocoder")
    return CheckpointInfo(
        path=path,
        layout=layout,
        family=FAMILY,
        version=version,
        transformer_config=config,
        components=[c for c in order if c in tensors],
        dtype_counts={c: dict(Counter(e.dtype for e in tensors[c].values())) for c in order if c in tensors},
        param_counts={
            c: sum(math.prod(e.shape) for k, e in tensors[c].items() if not _is_quant_companion(k))
            for c in order
            if c in tensors
        },
        fp8=any(e.dtype.startswith("F8") for e in tensors["transformer"].values()),
        source_config=source_config,
        tensors=tensors,
    )


def _refuse_other_families(path: Path, entries: dict[str, TensorEntry], metadata, source_config) -> None:
    """Refuses files of another model family, LTX-Video 0.9.x and LTX-2.5, saying what gave them away."""
    keys = set(entries)
    if not any(key.startswith(TRANSFORMER_PREFIX) for key in keys):
        if "proj_in.weight" in keys and "audio_proj_in.weight" in keys:
            raise WeightsError(
                f"{path}: diffusers-format transformer weights; pass the diffusers pipeline folder (the one holding "
                "transformer/config.json) instead of one of its files"
            )
        if "patchify_proj.weight" in keys and "audio_patchify_proj.weight" in keys:
            raise WeightsError(
                f"{path}: LTX-2 transformer keys without the '{TRANSFORMER_PREFIX}' prefix; this layout is not "
                f"supported yet (expected keys like '{TRANSFORMER_PREFIX}patchify_proj.weight')"
            )
        components = sorted({c for key in keys for prefix, c in _SINGLE_FILE_PREFIXES if key.startswith(prefix)})
        if components:
            raise WeightsError(f"{path}: holds no LTX-2 transformer, only {', '.join(components)}")
        raise WeightsError(
            f"{path}: not an LTX-2 checkpoint: no '{TRANSFORMER_PREFIX}' keys (first keys: "
            f"{', '.join(sorted(keys)[:5])})"
        )
    video_only = TRANSFORMER_PREFIX + "audio_patchify_proj.weight" not in keys
    if TRANSFORMER_PREFIX + "patchify_proj.weight" in keys and video_only:
        raise WeightsError(
            f"{path}: an LTX-Video (0.9.x) checkpoint (a video-only transformer: patchify_proj but no "
            "audio_patchify_proj); it is not supported, only LTX-2 and LTX-2.3 audio+video checkpoints"
        )
    found = []
    version = _version_tuple(metadata.get("model_version"))
    if version is not None and version >= (2, 4):
        found.append(f"metadata model_version={metadata['model_version']}")
    if "gemma_source_checkpoint" in metadata:
        found.append("metadata gemma_source_checkpoint")
    transformer = source_config.get("transformer", {})
    for setting, ltx2_value in (("ff_bias", True), ("use_keyframes_abs_pos_embedding", False),
                                ("use_prompt_adaln_single", True)):
        if transformer.get(setting, ltx2_value) != ltx2_value:
            found.append(f"config {setting}={transformer[setting]}")
    if TRANSFORMER_PREFIX + "keyframes_abs_pos_embedding" in keys:
        found.append("tensor keyframes_abs_pos_embedding")
    if any(key.startswith("duration_head.") for key in keys):
        found.append("duration_head tensors")
    if found:
        raise WeightsError(
            f"{path}: an LTX-2.5 checkpoint ({'; '.join(found)}); LTX-2.5 is not supported yet, only LTX-2 and LTX-2.3"
        )


def _check_model_version(path: Path, metadata: dict[str, str], version: str) -> None:
    declared = _version_tuple(metadata.get("model_version"))
    if declared is None:
        return
    said = "2.3" if declared >= (2, 3) else "2.0"
    if said != version:
        raise WeightsError(
            f"{path}: the checkpoint contradicts itself: its metadata says model_version={metadata['model_version']} "
            f"but its transformer tensors are those of LTX-{version}"
        )


def _version_tuple(text: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in text.split(".")) if text else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Component plans: class, config and tensor sources
# ---------------------------------------------------------------------------------------------------------------


def _plan(info: CheckpointInfo, component: str) -> _Plan:
    if component not in info.components:
        raise WeightsError(f"{info.path}: holds no {component} (it holds: {', '.join(info.components)})")
    if info.layout == "diffusers-dir":
        return _diffusers_plan(info, component)
    planners = {
        "transformer": _transformer_plan,
        "connectors": _connectors_plan,
        "video_vae": _video_vae_plan,
        "audio_vae": _audio_vae_plan,
        "vocoder": _vocoder_plan,
    }
    return planners[component](info)


def _diffusers_plan(info: CheckpointInfo, component: str) -> _Plan:
    folder = _DIFFUSERS_FOLDERS[component][0]
    source = info.source_config[folder]
    pool = dict(info.tensors[component])
    if component == "connectors":
        pool.update(info.tensors.get("text_projection", {}))
    cls = _model_class(source["_class_name"])
    where = str(info.path / folder)
    if component == "transformer":  # keys are already diffusers names; scaled-fp8 companions as in single files
        sources = {key: entry for key, entry in pool.items() if not _is_quant_companion(key)}
        return _Plan(where, component, cls, info.transformer_config, sources, pool, _unused_quant_keys(pool))
    config = {key: value for key, value in source.items() if not key.startswith("_")}
    return _Plan(where, component, cls, config, dict(pool), pool)


def _unused_quant_keys(pool: dict[str, TensorEntry]) -> set[str]:
    """The transformer's quantization extras that dequantizing on load does not use (activation scales, notes)."""
    return {key for key in pool if key.endswith(_UNUSED_QUANT_SUFFIXES)}


def _transformer_plan(info: CheckpointInfo) -> _Plan:
    pool = info.tensors["transformer"]
    sources = {name: pool[key] for name, key in convert_transformer_keys(pool).items()}
    ignored = _unused_quant_keys(pool)
    return _Plan(str(info.path), "transformer", _model_class("LTX2VideoTransformer3DModel"), info.transformer_config,
                 sources, pool, ignored)


def _connectors_plan(info: CheckpointInfo) -> _Plan:
    if "text_projection" not in info.components:
        raise WeightsError(
            f"{info.path}: has text connectors but no text_embedding_projection.* tensors (ComfyUI keeps the "
            "projection with the text encoder); load the connectors from the full Lightricks checkpoint"
        )
    pool = {**info.tensors["connectors"], **info.tensors["text_projection"]}
    sources = {_connector_name(key): entry for key, entry in pool.items()}
    shapes = {name: entry.shape for name, entry in sources.items()}
    config = _connectors_config(str(info.path), info.source_config.get("transformer", {}), shapes,
                                info.transformer_config)
    return _Plan(str(info.path), "connectors", _model_class("LTX2TextConnectors"), config, sources, pool)


def _section(info: CheckpointInfo, name: str) -> dict[str, Any]:
    section = info.source_config.get(name)
    if not isinstance(section, dict):
        raise WeightsError(
            f"{info.path}: its metadata config has no {name!r} section, so the {name} architecture cannot be told; "
            "use the original Lightricks file or a diffusers folder"
        )
    return section


def _video_vae_plan(info: CheckpointInfo) -> _Plan:
    config = _video_vae_config(str(info.path), _section(info, "vae"))
    downsamplers = len(config["downsample_type"])
    pool = info.tensors["video_vae"]
    sources, ignored = {}, set()
    for key, entry in pool.items():
        name = key.removeprefix("vae.")
        if name in _UNUSED_VAE_STATISTICS:
            ignored.add(key)
        else:
            sources[_video_vae_name(name, downsamplers)] = entry
    return _Plan(str(info.path), "video_vae", _model_class("AutoencoderKLLTX2Video"), config, sources, pool, ignored)


def _audio_vae_plan(info: CheckpointInfo) -> _Plan:
    config = _audio_vae_config(str(info.path), _section(info, "audio_vae"))
    pool = info.tensors["audio_vae"]
    sources, ignored = {}, set()
    for key, entry in pool.items():
        name = key.removeprefix("audio_vae.")
        if name in _UNUSED_VAE_STATISTICS:
            ignored.add(key)
        else:
            sources[_VAE_STATISTICS.get(name, name)] = entry
    return _Plan(str(info.path), "audio_vae", _model_class("AutoencoderKLLTX2Audio"), config, sources, pool, ignored)


def _vocoder_plan(info: CheckpointInfo) -> _Plan:
    section = _section(info, "vocoder")
    if "bwe" in section:  # LTX-2.3: BigVGAN v2 vocoder + bandwidth extension, nested sections
        cls_name, config = "LTX2VocoderWithBWE", _vocoder_with_bwe_config(str(info.path), section)
    else:
        cls_name, config = "LTX2Vocoder", _vocoder_config(str(info.path), section)
    pool = info.tensors["vocoder"]
    sources = {_vocoder_name(key): entry for key, entry in pool.items()}
    return _Plan(str(info.path), "vocoder", _model_class(cls_name), config, sources, pool)


def _model_class(name: str) -> type:
    import diffusers
    from diffusers.pipelines import ltx2

    return getattr(ltx2, name) if hasattr(ltx2, name) else getattr(diffusers, name)


# ---------------------------------------------------------------------------------------------------------------
# Building and streaming
# ---------------------------------------------------------------------------------------------------------------


def _empty_model(plan: _Plan) -> torch.nn.Module:
    with init_empty_weights():
        return plan.cls.from_config(plan.config)


def _build(plan: _Plan, dtype: torch.dtype, device: str | torch.device) -> torch.nn.Module:
    model = _empty_model(plan)
    _match(model, plan)
    loaded = set()
    for name, tensor in _stream(plan, dtype, device):
        _assign(model, name, tensor)
        loaded.add(name)
    for name, buffer in list(model.named_buffers()):
        if name not in loaded:  # computed at construction (filters, windows) and not stored
            _assign(model, name, _cast(buffer, dtype, device))
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise WeightsError(f"{plan.where}: {plan.component}: {_listing('tensors were never loaded', left)}")
    return model.eval()


def _verify(plan: _Plan) -> int:
    """Matches the component against its model and reads each tensor once, keeping none; returns its parameters."""
    model = _empty_model(plan)
    _match(model, plan)
    for _name, _tensor in _stream(plan, None, "cpu"):
        pass
    return sum(parameter.numel() for parameter in model.parameters())


def _match(model: torch.nn.Module, plan: _Plan) -> None:
    """Every model tensor has a source of the right shape, and every checkpoint tensor has a use."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    used = set(plan.ignored)
    bad_scales = []
    for entry in plan.sources.values():
        used.add(entry.key)
        scale = _scale_of(entry, plan.pool)
        if scale is not None:
            used.add(scale.key)
            if math.prod(scale.shape) != 1:
                bad_scales.append(f"{scale.key} {scale.shape}")
    problems = []
    missing = sorted(set(expected) - set(plan.sources))
    if missing:
        problems.append(_listing("missing", missing))
    unexpected = sorted(f"{name} (from {plan.sources[name].key})" for name in set(plan.sources) - set(expected))
    if unexpected:
        problems.append(_listing("not in the model", unexpected))
    stray = sorted(set(plan.pool) - used)
    if stray:
        problems.append(_listing("unused", stray))
    wrong = [
        f"{name}: {entry.shape} in the file, {expected[name]} in the model"
        for name, entry in sorted(plan.sources.items())
        if name in expected and entry.shape != expected[name]
    ]
    if wrong:
        problems.append(_listing("with the wrong shape", wrong))
    if bad_scales:
        problems.append(_listing("fp8 scales that are not per-tensor (per-channel / block-wise unsupported)",
                                 bad_scales))
    if problems:
        raise WeightsError(
            f"{plan.where}: the {plan.component} tensors do not match {plan.cls.__name__}: " + "; ".join(problems)
        )


def _stream(plan: _Plan, dtype: torch.dtype | None, device) -> Iterator[tuple[str, torch.Tensor]]:
    """(model name, tensor in `dtype` on `device`) one at a time, each file memory-mapped once, scaled fp8
    dequantized; `dtype` None keeps the stored dtype (float32 for dequantized tensors)."""
    by_file: dict[Path, list[tuple[str, TensorEntry]]] = {}
    for name, entry in plan.sources.items():
        by_file.setdefault(entry.file, []).append((name, entry))
    for file, items in by_file.items():
        with _open(file) as handle:
            for name, entry in items:
                tensor = handle.get_tensor(entry.key)
                scale = _scale_of(entry, plan.pool)
                if scale is None:
                    yield name, _cast(tensor, dtype, device)
                    continue
                if scale.file == file:
                    factor = handle.get_tensor(scale.key)
                else:
                    with _open(scale.file) as other:
                        factor = other.get_tensor(scale.key)
                dequantized = tensor.to(device=device, dtype=torch.float32) * factor.to(device, torch.float32)
                yield name, dequantized.to(dtype)


def _open(file: Path):
    """The file memory-mapped for reading tensors (the whole file is mapped, nothing is read until asked for)."""
    try:
        return safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise WeightsError(f"{file}: could not be opened for reading tensors ({err})") from None


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attribute in module._parameters:
        module._parameters[attribute] = torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    else:
        module._buffers[attribute] = tensor


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)
