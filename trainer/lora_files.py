"""LoRA files on disk: the ComfyUI and diffusers formats, both ways, and their inspection.

Loaders disagree on scale: ComfyUI multiplies B @ A by alpha/rank only when a `.alpha` tensor exists, diffusers
takes alpha from the `lora_adapter_metadata` JSON (else alpha = rank), Lightricks' ltx-core ignores alpha. So we
fold alpha/rank into lora_B on export and write no alpha tensor: every loader then applies the same delta B @ A.

Module names: inside `transformer_blocks` the Lightricks/ComfyUI names equal the diffusers ones; a few top-level
modules are renamed (the table below, as diffusers' own LTX-2 LoRA conversion does). `LoraFile.modules` and
`save_lora` use diffusers names; ComfyUI files get the Lightricks names.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from trainer.io import write_atomic

FORMATS = ("comfyui", "diffusers")
FORMAT_VERSION = "1"
_PREFIX = {"comfyui": "diffusion_model.", "diffusers": "transformer."}
_DIFFUSERS_METADATA = "lora_adapter_metadata"
_OWN_METADATA = {"format", "ltx_lora_format", "ltx_lora_format_version", "scale_folded", _DIFFUSERS_METADATA}
_ACCEPTED = (
    "accepted: `<prefix><module>.lora_A.weight`/`.lora_B.weight` (or `.lora_down.weight`/`.lora_up.weight`) with "
    "prefix `diffusion_model.`, `transformer.` or none, or kohya `lora_unet_<module_with_underscores>`"
)

# First name component, Lightricks (ComfyUI) -> diffusers.
_NATIVE_TOP = {
    "patchify_proj": "proj_in",
    "audio_patchify_proj": "audio_proj_in",
    "adaln_single": "time_embed",
    "audio_adaln_single": "audio_time_embed",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
    "prompt_adaln_single": "prompt_adaln",
    "audio_prompt_adaln_single": "audio_prompt_adaln",
}
_DIFFUSERS_TOP = {v: k for k, v in _NATIVE_TOP.items()}

_KEY = re.compile(
    r"(?P<prefix>diffusion_model\.|transformer\.|lora_unet_)?(?P<module>.+?)"
    r"\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_down\.weight|lora_up\.weight|alpha)"
)
_KIND = {"lora_A.weight": "A", "lora_down.weight": "A", "lora_B.weight": "B", "lora_up.weight": "B", "alpha": "alpha"}
_KIND_NAME = {"A": "lora_A", "B": "lora_B", "alpha": "alpha"}
_FORMAT_OF_PREFIX = {"diffusion_model.": "comfyui", "transformer.": "diffusers", "lora_unet_": "kohya", "": "peft"}
_ATTNS = "audio_to_video_attn|video_to_audio_attn|audio_attn1|audio_attn2|attn1|attn2"
# kohya names flatten dots to underscores; only the block modules can be told apart unambiguously.
_KOHYA = re.compile(
    rf"transformer_blocks_(\d+)_(?:({_ATTNS})_(to_q|to_k|to_v|to_out_0|to_gate_logits)|(audio_ff|ff)_net_(0_proj|2))"
)
_GROUPS = {
    "attn1": "video self-attn",
    "attn2": "video text cross-attn",
    "audio_attn1": "audio self-attn",
    "audio_attn2": "audio text cross-attn",
    "audio_to_video_attn": "audio-to-video cross-attn (a2v)",
    "video_to_audio_attn": "video-to-audio cross-attn (v2a)",
    "ff": "video FF",
    "audio_ff": "audio FF",
}
_BLOCK_MODULE = re.compile(r"transformer_blocks\.(\d+)\.(\w+)\.")


class LoraFileError(ValueError):
    """A LoRA file that cannot be read, written or applied; the message names the file and what is wrong."""


@dataclass
class LoraFile:
    """A LoRA read from disk. `modules` maps diffusers module names to (A, B) with the file's scale already in B,
    so the weight delta is exactly B @ A whatever format the file came in."""

    path: Path
    format: str  # "comfyui" | "diffusers" | "peft" (bare keys) | "kohya"
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int  # the most common rank
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _rename_top(module: str, table: dict[str, str]) -> str:
    head, _, rest = module.partition(".")
    return f"{table.get(head, head)}.{rest}" if rest else table.get(head, head)


def save_lora(path, lora_state: dict[str, torch.Tensor], *, rank: int, alpha: float, fmt: str, metadata: dict) -> None:
    """Writes a PEFT-layout adapter (`get_lora_state_dict`) with alpha/rank folded into lora_B."""
    path = Path(path)
    modules = {}
    for key in lora_state:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            a, b = lora_state[key], lora_state.get(f"{module}.lora_B.weight")
            if b is None or a.shape[0] != rank:
                raise LoraFileError(f"cannot write {path}: adapter module {module} lacks lora_B or is not rank {rank}")
            modules[module] = (a, b.float() * (alpha / rank))
    if len(modules) * 2 != len(lora_state):
        raise LoraFileError(f"cannot write {path}: adapter state has keys other than paired lora_A/lora_B weights")
    _write(path, modules, fmt, {**metadata, "rank": rank, "alpha": alpha})


def _write(path: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], fmt: str, metadata: dict) -> None:
    """Writes already-folded (A, B) pairs; atomic, so a crash never leaves a half file under the final name."""
    if fmt not in FORMATS:
        raise LoraFileError(f"cannot write {path}: unknown LoRA format {fmt!r}; formats: {', '.join(FORMATS)}")
    prefix = _PREFIX[fmt]
    tensors = {}
    for module, (a, b) in modules.items():
        name = prefix + (_rename_top(module, _DIFFUSERS_TOP) if fmt == "comfyui" else module)
        for kind, t in (("lora_A", a), ("lora_B", b.to(a.dtype))):
            tensors[f"{name}.{kind}.weight"] = (t.float() if t.element_size() > 4 else t).contiguous()
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items() if k not in _OWN_METADATA}
    header.update(format="pt", ltx_lora_format=fmt, ltx_lora_format_version=FORMAT_VERSION, scale_folded="true")
    if fmt == "diffusers":
        # Prefixed keys, as diffusers' pipeline loader filters them by "transformer."; alpha == r means scale 1.
        ranks = {m: a.shape[0] for m, (a, _) in modules.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        pattern = {m: k for m, k in ranks.items() if k != r}
        config = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": pattern,
                  "target_modules": sorted(modules)}
        header[_DIFFUSERS_METADATA] = json.dumps({f"transformer.{k}": v for k, v in config.items()}, sort_keys=True)
    write_atomic(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=header))


def _kohya_module(name: str) -> str | None:
    m = _KOHYA.fullmatch(name)
    if not m:
        return None
    inner = f"{m[2]}.{m[3].replace('to_out_0', 'to_out.0')}" if m[2] else f"{m[4]}.net.{m[5].replace('_', '.')}"
    return f"transformer_blocks.{m[1]}.{inner}"


def _open_error(path: Path, err: Exception) -> LoraFileError:
    if isinstance(err, OSError):
        return LoraFileError(f"{path} cannot be read ({err})")
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return LoraFileError(f"{path} is not a safetensors file ({err}); a LoRA must be a .safetensors file")
    return LoraFileError(f"{path} is a truncated or corrupt safetensors file ({err}); re-download or re-export it")


def _diffusers_config(path: Path, metadata: dict[str, str]) -> dict | None:
    raw = metadata.get(_DIFFUSERS_METADATA)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraFileError(f"{path}: metadata `{_DIFFUSERS_METADATA}` is not valid JSON ({err})") from None
    return {k.removeprefix("transformer."): v for k, v in config.items()}


def _peft_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name or its dotted suffix."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _lora_tensors(f, keys: list[str]) -> tuple[dict, list[str]]:
    """LoRA tensors grouped by (key prefix, diffusers module name), and the keys that are not LoRA tensors."""
    parts, other = {}, []
    for key in keys:
        m = _KEY.fullmatch(key)
        module = m and (_kohya_module(m["module"]) if m["prefix"] == "lora_unet_" else m["module"])
        if not module:
            other.append(key)
            continue
        found = parts.setdefault((m["prefix"] or "", _rename_top(module, _NATIVE_TOP)), {})
        found[_KIND[m["kind"]]] = (key, f.get_tensor(key))
    return parts, other


def _checked_pair(path: Path, module: str, found: dict) -> tuple[torch.Tensor, torch.Tensor]:
    (a_key, a), (b_key, b) = found["A"], found["B"]
    for key, t in ((a_key, a), (b_key, b)):
        if not t.is_floating_point() or t.ndim != 2:
            raise LoraFileError(f"{path}: {key} is a {t.dtype} tensor of shape {tuple(t.shape)}; "
                                "LoRA weights must be 2-D floating point")
        if not torch.isfinite(t).all():
            raise LoraFileError(f"{path}: {key} contains NaN or inf values; the LoRA is broken (diverged training?)")
    if b.shape[1] != a.shape[0]:
        raise LoraFileError(f"{path}: rank mismatch in {module}: lora_A has rank {a.shape[0]}, lora_B has rank "
                            f"{b.shape[1]}; A must be (rank, in) and B (out, rank)")
    return a.float(), b.float()


def read_lora(path) -> LoraFile:
    """Reads a LoRA in any supported layout and applies that layout's scale rule, so formats compare directly."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path} does not exist or is not a file; give a LoRA .safetensors file")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata, keys = dict(f.metadata() or {}), list(f.keys())
            parts, other = _lora_tensors(f, keys)
    except (safetensors.SafetensorError, OSError) as err:
        raise _open_error(path, err) from None
    if not parts:
        if (weights := sum(k.endswith(".weight") for k in keys)) >= 10:
            raise LoraFileError(f"{path} has no LoRA tensors but {weights} plain weights: it looks like a base "
                                f"model checkpoint, not a LoRA; {_ACCEPTED}")
        raise LoraFileError(f"{path} has no LoRA tensors (keys: {keys[:5]}); {_ACCEPTED}")
    # One layout per file; keys in another (text-encoder or connector LoRAs, say) are not for this transformer.
    counts = Counter(p for p, _ in parts)
    layout = max(counts, key=lambda p: (counts[p], p != ""))  # on a tie, a prefixed layout over bare keys
    other += [key for (p, _), found in parts.items() if p != layout for key, _ in found.values()]
    parts = {module: found for (p, module), found in parts.items() if p == layout}
    fmt = _FORMAT_OF_PREFIX[layout]

    warnings = []
    if other:
        warnings.append(f"{len(other)} keys are not LoRA tensors of the transformer in this file's layout and are "
                        f"skipped: {other[:5]}")
    if fmt == "diffusers":
        warnings.append("keys have the `transformer.` prefix: ComfyUI and Lightricks' loaders will not load them; "
                        "run `ltx-lora export` to convert")
    elif fmt == "peft":
        warnings.append("keys have no prefix: diffusers' pipeline loader silently skips them and older ComfyUI "
                        "does not load them; run `ltx-lora export` to convert")
    config = _diffusers_config(path, metadata)
    metadata_rule = config is not None and fmt in ("diffusers", "peft")  # the layouts diffusers writes
    if config and not metadata_rule and config.get("lora_alpha") != config.get("r"):
        warnings.append("metadata `lora_adapter_metadata` has lora_alpha != r: diffusers scales this file by "
                        "alpha/r, ComfyUI does not; read here with ComfyUI's rule")

    unpaired = [f"{module} (has only {'/'.join(_KIND_NAME[k] for k in found)})" for module, found in parts.items()
                if "A" not in found or "B" not in found]
    if unpaired:
        raise LoraFileError(f"{path}: {len(unpaired)} modules lack their other half: {unpaired[:5]}; "
                            "every lora_A (down) needs its lora_B (up) and vice versa")
    modules = {}
    for module, found in parts.items():
        a, b = _checked_pair(path, module, found)
        rank = a.shape[0]
        if "alpha" in found:  # ComfyUI's rule
            scale = float(found["alpha"][1]) / rank
        elif metadata_rule:  # diffusers' rule; PEFT's rslora divides by sqrt(r)
            alpha = _peft_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
            scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        else:
            scale = 1.0
        modules[module] = (a, b * scale)
    rank = Counter(a.shape[0] for a, _ in modules.values()).most_common(1)[0][0]
    return LoraFile(path, fmt, modules, rank, metadata, warnings)


def convert_lora_file(src, dst, fmt: str) -> None:
    """Rewrites any readable LoRA in `fmt`, scale folded, descriptive metadata carried over."""
    lf = read_lora(src)
    _write(Path(dst), lf.modules, fmt, {"rank": str(lf.rank), **lf.metadata})


def describe_lora(lf: LoraFile) -> str:
    """The `ltx-lora inspect` report: what the file adapts and what it says about itself."""
    md = lf.metadata
    folded = " (ltx-lora, alpha folded into lora_B)" if md.get("scale_folded") == "true" else ""
    ranks = sorted({a.shape[0] for a, _ in lf.modules.values()})
    lines = [
        f"file:     {lf.path}",
        f"format:   {lf.format}{folded}",
        f"model:    {md.get('model_target', 'unknown')} (LTX version {md.get('model_version', 'unknown')})",
        f"rank:     {lf.rank}" + (f" (ranks {', '.join(map(str, ranks))})" if len(ranks) > 1 else ""),
        f"modules:  {len(lf.modules)}",
    ]
    groups, blocks = Counter(), set()
    for module in lf.modules:
        m = _BLOCK_MODULE.match(module)
        if m and m[2] in _GROUPS:
            groups[_GROUPS[m[2]]] += 1
            blocks.add(int(m[1]))
        else:
            groups["outside the blocks"] += 1
    lines += [f"  {name}: {count}" for name, count in sorted(groups.items())]
    if blocks:
        lines.append(f"blocks:   {min(blocks)}-{max(blocks)} ({len(blocks)} blocks)")
    shown = {"model_target", "model_version", "rank", *_OWN_METADATA}
    lines += [f"{key}: {value}" for key, value in sorted(md.items()) if key not in shown]
    lines += [f"warning: {w}" for w in lf.warnings]
    return "\n".join(lines)


def merge_lora_into(model: torch.nn.Module, lf: LoraFile, strength: float = 1.0) -> None:
    """Adds strength * B @ A to each module's weight in place (a plain diffusers model, no PEFT layers)."""
    named = dict(model.named_modules())
    problems = []
    for module, (a, b) in lf.modules.items():
        weight = getattr(named.get(module), "weight", None)
        if not isinstance(weight, torch.Tensor):
            problems.append(f"{module} (not in the model)")
        elif weight.shape != (b.shape[0], a.shape[1]):
            problems.append(f"{module} (weight {tuple(weight.shape)}, LoRA delta {(b.shape[0], a.shape[1])})")
    if problems:
        raise LoraFileError(f"{lf.path} does not fit this model ({len(problems)} modules): {problems[:5]}; "
                            "is it a LoRA for another model or LTX version?")
    with torch.no_grad():
        for module, (a, b) in lf.modules.items():
            weight = named[module].weight
            weight.add_((strength * (b.to(weight.device) @ a.to(weight.device))).to(weight.dtype))
