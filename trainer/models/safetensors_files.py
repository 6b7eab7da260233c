"""Reading safetensors checkpoints without their data: file headers, diffusers folders and shards, fp8 scale companions.

Pickles are refused by name and never opened. `WeightsError` lives here, in the module every other loading module
imports, so that all of them can raise it; `trainer.models.loading` re-exports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Scaled-fp8 companions. `<tensor>_scale` is the layout of Lightricks' fp8 releases and of ComfyUI's current one
# (`weight_scale`; ltx-core also accepts `bias_scale`); `<layer>.scale_weight` is ComfyUI's older layout, marked by a
# `scaled_fp8` tensor. Activation scales (`input_scale`, `scale_input`) only serve fp8 matmul kernels, and
# `comfy_quant` holds ComfyUI's per-layer format note: weights dequantized on load use neither.
_SCALE_SUFFIXES = (".weight_scale", ".bias_scale", ".scale_weight")
_UNUSED_QUANT_SUFFIXES = (".input_scale", ".scale_input", ".comfy_quant", "scaled_fp8")
_INTEGER_WEIGHT_DTYPES = ("U8", "I8")  # nvfp4 / int8 packings


class WeightsError(ValueError):
    """A checkpoint that cannot be used; the message names the file, what was found and what would be accepted."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint as its safetensors header describes it, without its data."""

    file: Path
    key: str
    dtype: str  # safetensors dtype name: "BF16", "F32", "F8_E4M3", ...
    shape: tuple[int, ...]


def _read_header(file: Path) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    """Metadata and tensor entries of one safetensors file, from its header alone (an 8-byte length, then JSON);
    refuses a file whose header or tensor data is cut short."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or 8 + length > size:
            raise WeightsError(
                f"{file}: truncated or not a safetensors file: its first 8 bytes announce a "
                f"{length if length is not None else '?'}-byte header but the file has {size} bytes; re-download it"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsError(f"{file}: not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{file}: not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError(
            f"{file}: not a safetensors file: its header __metadata__ is {_short(metadata)}; expected a JSON object "
            "of strings"
        )
    data_bytes = size - 8 - length
    entries = {}
    for key, spec in header.items():
        if not isinstance(spec, dict):
            raise WeightsError(
                f"{file}: not a safetensors file: header entry {key!r} is {_short(spec)}; expected a JSON object "
                "with dtype, shape and data_offsets"
            )
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str):
            problem = f"dtype {_short(dtype)}; expected a string such as 'BF16'"
        elif not _whole_numbers(shape):
            problem = f"shape {_short(shape)}; expected a list of non-negative integers"
        elif not (_whole_numbers(offsets) and len(offsets) == 2):
            problem = f"data_offsets {_short(offsets)}; expected two non-negative integers [start, end]"
        else:
            problem = None
        if problem:
            raise WeightsError(f"{file}: not a safetensors file: header entry {key!r} has {problem}")
        start, end = offsets
        if not start <= end <= data_bytes:
            raise WeightsError(
                f"{file}: truncated or corrupt: tensor {key!r} should sit at data bytes {start}..{end} but the file "
                f"holds {data_bytes} data bytes; re-download it"
            )
        entries[key] = TensorEntry(file, key, dtype, tuple(shape))
    return metadata, entries


def _whole_numbers(value: Any) -> bool:
    """A JSON list of non-negative integers (booleans are not numbers here)."""
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) and item >= 0 for item in value
    )


def _short(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut short for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_folder(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of a diffusers component folder: one safetensors file, or the shards its index names."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = _read_json(indexes[0]).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise WeightsError(f"{indexes[0]}: {_listing('shards are missing', absent)}")
    else:
        files = sorted(folder.glob("*.safetensors"))
        if len(files) != 1:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            found = ", ".join(p.name for p in files) or "none"
            if pickles:
                found += f" (and pickled {', '.join(pickles)})"
            raise WeightsError(
                f"{folder}: expected one *.safetensors file or a *.safetensors.index.json, found {found}; pickled "
                "weights are never opened here, convert them to safetensors"
            )
        weight_map = None
    entries: dict[str, TensorEntry] = {}
    for file in files:
        _, file_entries = _read_header(file)
        twice = sorted(set(entries) & set(file_entries))
        if twice:
            raise WeightsError(f"{folder}: {_listing('tensors stored in two shards', twice)}")
        entries.update(file_entries)
    if weight_map is not None and set(weight_map) != set(entries):
        lost = sorted(set(weight_map) - set(entries)) or sorted(set(entries) - set(weight_map))
        raise WeightsError(f"{indexes[0]}: index and shards disagree: {_listing('tensors differ', lost)}")
    return entries


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise WeightsError(f"{file}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def _metadata_config(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The JSON `config` metadata entry (sections transformer, vae, audio_vae, vocoder, scheduler), or {}."""
    if "config" not in metadata:
        return {}
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError as err:
        raise WeightsError(f"{path}: its metadata 'config' is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: its metadata 'config' is a {type(config).__name__}, expected a JSON object")
    return config


def _scale_of(entry: TensorEntry, pool: dict[str, TensorEntry]) -> TensorEntry | None:
    """The scaled-fp8 companion of a tensor, if the checkpoint has one (applied whatever the tensor's dtype, as
    ltx-core does)."""
    candidates = [entry.key + "_scale"]
    if entry.key.endswith(".weight"):
        candidates.append(entry.key[: -len("weight")] + "scale_weight")
    return next((pool[key] for key in candidates if key in pool), None)


def _is_quant_companion(key: str) -> bool:
    return key.endswith(_SCALE_SUFFIXES + _UNUSED_QUANT_SUFFIXES)


def _listing(what: str, names: list[str], limit: int = 10) -> str:
    more = f", ... {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} {what} ({', '.join(names[:limit])}{more})"
