"""The run configuration: typed schema, YAML loading, recipes merged underneath, `--set` overrides, clear errors.

Precedence, lowest first: schema defaults < recipe preset < the YAML file < `--set key=value` overrides. Every
error names the key, the bad value and what is accepted, and is raised before any model is built.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from trainer.models.registry import TARGETS
from trainer.modes import MODE_SPECS
from trainer.recipes import RECIPES

MODES = tuple(MODE_SPECS)
# Modes whose samples need audio latents (audio generated or a clean condition).
AUDIO_MODES = tuple(mode for mode, spec in MODE_SPECS.items() if spec.audio != "absent")
# `lora.targets: auto`: the modules of what the mode generates, and the cross attention a condition flows through.
AUTO_TARGETS = {
    "text-to-video": "video",
    "image-to-video": "video",
    "ic-lora": "ic-lora",
    "text-to-audio-video": "audio-video",
    "audio-to-video": "audio-to-video",
    "video-to-audio": "video-to-audio",
    "audio-only": "audio",
}


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message says where and how."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class ModelSection(_Strict):
    target: Literal["ltx-2.3", "ltx-2", "tiny-ltx-2.3", "tiny-ltx-2"] = "ltx-2.3"
    # The public weights: a Lightricks single file, a transformer-only file, or a diffusers-format folder. The
    # architecture is read from it; `target` names the version it must be and the LoRA family it trains.
    checkpoint: str | None = None
    # Where the VAEs, audio VAE, vocoder and text connectors are, when `checkpoint` holds only the transformer.
    components: str | None = None
    # A local Gemma 3 12B folder (Hugging Face layout) with its tokenizer, for encoding captions.
    text_encoder: str | None = None
    # Seed of the random weights of a tiny target built without a checkpoint.
    init_seed: int = 0

    @model_validator(mode="after")
    def _weights_given(self) -> "ModelSection":
        if self.checkpoint is None and not TARGETS[self.target].tiny:
            raise ValueError(
                f"model.target = {self.target!r} needs its public weights: set model.checkpoint to the "
                f"single-file release or the diffusers folder (only tiny-* targets can be built with random weights)"
            )
        for key in ("checkpoint", "components", "text_encoder"):
            value = getattr(self, key)
            if value is not None and not Path(value).exists():
                raise ValueError(f"model.{key} = {value!r} does not exist. {_DOWNLOAD_HINTS[key]}")
        return self


# ltx-lora never downloads: a path that is missing (or a hub id) gets told what to fetch and where.
_DOWNLOAD_HINTS = {
    "checkpoint": "Nothing is downloaded at run time: fetch the weights first, e.g. `hf download Lightricks/LTX-2.3 "
    "ltx-2.3-22b-dev.safetensors --local-dir /models` (LTX-2: `hf download Lightricks/LTX-2 "
    "ltx-2-19b-dev.safetensors --local-dir /models`), then set model.checkpoint to the downloaded file",
    "components": "Point it at the single-file release or the diffusers folder that holds the VAEs, vocoder and "
    "text connectors",
    "text_encoder": "Nothing is downloaded at run time: fetch Gemma 3 12B first, e.g. `hf download "
    "google/gemma-3-12b-it --local-dir /models/gemma-3-12b-it` (gated: accept its licence on Hugging Face), then "
    "set model.text_encoder to that folder",
}


class LoraSection(_Strict):
    rank: PositiveInt = 32
    # None means alpha = rank (scale 1), the official default.
    alpha: PositiveFloat | None = None
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # A preset (video, audio, audio-video, ic-lora), "auto" (chosen by the mode), or module-name suffixes.
    targets: str | list[str] = "auto"

    @field_validator("targets")
    @classmethod
    def _known_preset(cls, value: str | list[str]) -> str | list[str]:
        from trainer.lora import PRESET_GROUPS

        if isinstance(value, str) and value != "auto" and value not in PRESET_GROUPS:
            raise ValueError(f"must be 'auto', one of {sorted(PRESET_GROUPS)}, or a list of module-name suffixes")
        if isinstance(value, list) and not value:
            raise ValueError("an empty list adapts nothing; give module-name suffixes such as ['to_q', 'to_v']")
        return value


class OptimSection(_Strict):
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    learning_rate: PositiveFloat = 1e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    # Where linear and cosine schedules end, as a fraction of learning_rate (the official recipe decays to 10%).
    final_lr_fraction: Annotated[float, Field(ge=0, le=1)] = 0.1
    # Gradient-norm clipping; null switches it off.
    grad_clip: PositiveFloat | None = 1.0


class TrainSection(_Strict):
    steps: PositiveInt = 2000
    batch_size: PositiveInt = 1
    gradient_accumulation_steps: PositiveInt = 1
    # Recompute blocks in the backward pass: true (every block), false, or how many blocks (the first ones); auto
    # measures the memory a kept block takes on the largest batch and chooses how many blocks to keep, offload and
    # checkpoint within memory_limit_gib (trainer/memory_plan.py; on the CPU nothing is checkpointed).
    gradient_checkpointing: Literal["auto"] | bool | Annotated[int, Field(ge=0)] = "auto"
    # With gradient_checkpointing: auto, the peak GPU memory to plan for; null: 90% of the GPU's memory.
    memory_limit_gib: PositiveFloat | None = None
    # Of the blocks not checkpointed, recompute the video feed-forward's hidden activation in the backward: true (all
    # of them), false, or how many (the first ones). Cheaper per GiB than checkpointing whole blocks.
    recompute_feedforward: bool | Annotated[int, Field(ge=0)] = False
    # Of the blocks not checkpointed, keep the saved activations of these in pinned host memory until their backward:
    # true (all of them), false, or how many (spread over them). Costs no GPU time while the host link keeps up.
    offload_activations: bool | Annotated[int, Field(ge=0)] = False
    # torch.compile each transformer block (one graph serves all): auto = on CUDA GPUs, off on the CPU.
    compile: Literal["auto"] | bool = "auto"
    # Compiled blocks that are not checkpointed keep at most this fraction of their activations for the backward and
    # recompute the cheapest of the rest (1 = keep all). Only with compile.
    activation_memory_budget: Annotated[float, Field(gt=0, le=1)] = 1.0
    # Frozen base Linears of the blocks in fp8 (e4m3, trainer/fp8.py): half their weight memory; GPUs with fp8 tensor
    # cores (compute capability 8.9+). LoRA adapters stay in full precision.
    fp8: bool = False
    # auto: bf16 on CUDA, fp32 on CPU.
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    seed: int = 42
    checkpoint_every: PositiveInt = 250
    keep_last: PositiveInt = 3
    log_every: PositiveInt = 10
    # Consecutive steps with a NaN/inf loss or gradient that stop the run.
    max_bad_steps: PositiveInt = 5
    # Probability that a sample's caption is replaced by the empty prompt (keeps unconditional generation working).
    caption_dropout_p: Annotated[float, Field(ge=0, lt=1)] = 0.0

    @model_validator(mode="after")
    def _memory_plan_settings(self) -> "TrainSection":
        auto = self.gradient_checkpointing == "auto"
        if auto:
            default = "" if "gradient_checkpointing" in self.model_fields_set else " (the default)"
            for key in ("offload_activations", "recompute_feedforward"):
                if getattr(self, key) is not False:
                    raise ValueError(f"train.{key} = {getattr(self, key)!r} cannot be combined with "
                                     f"train.gradient_checkpointing = 'auto'{default}, which chooses the offloaded "
                                     f"blocks itself: leave {key} false, or give gradient_checkpointing true, false "
                                     f"or a number of blocks")
        elif self.memory_limit_gib is not None:
            raise ValueError(f"train.memory_limit_gib = {self.memory_limit_gib} is only used by "
                             f"train.gradient_checkpointing = 'auto' (it is {self.gradient_checkpointing!r}): set "
                             f"gradient_checkpointing to auto, or remove memory_limit_gib")
        return self


class ConditioningSection(_Strict):
    # image-to-video: the probability that a sample's first latent frame is a clean condition (no loss).
    first_frame_p: Annotated[float, Field(ge=0, le=1)] = 0.1


def _check_8k_plus_1(value: int) -> int:
    if (value - 1) % 8:
        raise ValueError(f"must be 8k+1 (the VAE compresses time 8x after a causal first frame), e.g. "
                         f"{value - (value - 1) % 8} or {value - (value - 1) % 8 + 8}")
    return value


def _check_multiple_of_32(value: int) -> int:
    if value % 32:
        raise ValueError(f"must be a multiple of 32 (the VAE compresses space 32x), e.g. {max(32, value // 32 * 32)}")
    return value


# Pixel sizes the VAE can encode: frame counts 8k+1, widths and heights multiples of 32.
Frames = Annotated[int, Field(gt=0), AfterValidator(_check_8k_plus_1)]
Side = Annotated[int, Field(gt=0), AfterValidator(_check_multiple_of_32)]


class SyntheticSection(_Strict):
    """A generated dataset (written into data.cache_dir when it has no manifest) for smoke runs and tests."""

    num_samples: PositiveInt = 8
    frames: Frames = 17
    height: Side = 128
    width: Side = 192
    fps: PositiveFloat = 24.0
    audio: bool = True
    text_len: PositiveInt = 16
    seed: int = 0


class DataSection(_Strict):
    cache_dir: str
    # A folder of media with same-stem .txt captions, or a CSV / JSONL manifest; `preprocess` turns it into the cache.
    source: str | None = None
    # Write the built-in demo dataset (short clips whose sound follows the motion) into `source` when it is missing.
    demo: bool = False
    # "auto", or a list of "WxHxF" buckets (W, H multiples of 32; F = 8k+1 for clips, 1 for images).
    buckets: Literal["auto"] | list[str] = "auto"
    # Frames are taken at this rate (resampled, not just the first F frames); audio/video alignment depends on it.
    fps: PositiveFloat = 24.0
    # Limits of the automatic buckets.
    max_pixels: PositiveInt = 768 * 512
    max_frames: PositiveInt = 121
    # IC-LoRA references (manifest column `reference`) are encoded at the bucket's width and height divided by this.
    reference_downscale: PositiveInt = 1
    # A reference keeps every k-th of the sample's frames: (F - 1) / k + 1 frames, which must be 8j+1.
    reference_temporal_scale: PositiveInt = 1
    synthetic: SyntheticSection | None = None
    num_workers: Annotated[int, Field(ge=0)] = 0
    # Preprocessing: samples probed, then decoded ahead, on this many CPU threads while earlier ones are encoded.
    decode_threads: PositiveInt = 4

    @field_validator("buckets")
    @classmethod
    def _valid_buckets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            from trainer.data.media import parse_bucket

            if not value:
                raise ValueError("an empty list allows no sample; give 'auto' or buckets such as ['768x512x121']")
            for text in value:
                parse_bucket(text)
        return value

    @field_validator("max_frames")
    @classmethod
    def _max_frames_8k_plus_1(cls, value: int) -> int:
        if (value - 1) % 8:
            raise ValueError("must be 8k+1 (the VAE compresses time 8x after a causal first frame)")
        return value


class ExportSection(_Strict):
    formats: list[Literal["comfyui", "diffusers"]] = ["comfyui", "diffusers"]
    name: str = "lora"


def _media_file(value: str, kind: str, purpose: str) -> str:
    """A conditioning file must exist and be of a type we decode (checked when the config loads, not mid-run)."""
    from trainer.data.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    suffixes = {"image": IMAGE_SUFFIXES, "video": VIDEO_SUFFIXES}[kind]
    accepted = f"accepted: an existing {kind} file ({', '.join(suffixes)}) {purpose}"
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"{'is not a file' if path.exists() else 'no such file'}; {accepted}")
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"unsupported file type {path.suffix!r}; {accepted}")
    return value


class ValidationPrompt(_Strict):
    """One validation sample: the prompt, and the conditions its mode takes."""

    prompt: Annotated[str, Field(min_length=1)]
    # image-to-video and ic-lora: the first frame of the sample.
    image: str | None = None
    # ic-lora: the reference (control) video the LoRA learnt to follow.
    reference: str | None = None

    @field_validator("image")
    @classmethod
    def _image_exists(cls, value: str | None) -> str | None:
        return value if value is None else _media_file(value, "image", "for the first frame")

    @field_validator("reference")
    @classmethod
    def _reference_exists(cls, value: str | None) -> str | None:
        return value if value is None else _media_file(value, "video", "as the IC-LoRA reference")


class ValidationSection(_Strict):
    """Sample videos rendered with the LoRA while training (docs/validation.md); no prompts = off."""

    # Each entry a prompt, or a mapping with `prompt` and the conditions of the mode (`image`, `reference`).
    prompts: list[ValidationPrompt] = []
    # Steps between rounds; null renders only at the end.
    every: PositiveInt | None = None
    width: Side = 768
    height: Side = 512
    frames: Frames = 121
    fps: PositiveFloat = 24.0
    num_inference_steps: PositiveInt = 30
    # The diffusers LTX-2 pipelines' defaults (the values Lightricks suggests for LTX-2.3).
    guidance_scale: Annotated[float, Field(ge=1)] = 3.0
    audio_guidance_scale: Annotated[float, Field(ge=1)] = 7.0
    stg_scale: Annotated[float, Field(ge=0)] = 1.0
    modality_scale: Annotated[float, Field(ge=1)] = 3.0
    # Every round uses this seed, so samples of different steps are comparable.
    seed: int = 42
    # None: the published negative prompt (diffusers' DEFAULT_NEGATIVE_PROMPT).
    negative_prompt: str | None = None

    @field_validator("prompts", mode="before")
    @classmethod
    def _strings_are_prompts(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"prompt": item} if isinstance(item, str) else item for item in value]
        return value


class RunConfig(_Strict):
    output_dir: str
    model: ModelSection
    mode: Literal[MODES] = "text-to-video"  # type: ignore[valid-type]
    recipe: Literal["character", "style", "motion"] | None = None
    trigger_word: str | None = None
    # Attention: "triton" = our fused kernels (ltx_kernels/attention.py), "sdpa" = PyTorch's (cuDNN on Hopper); "auto" =
    # the faster measured path, which is sdpa at every LTX-2 shape today (docs/benchmarks.md).
    kernels: Literal["auto", "triton", "sdpa"] = "auto"
    lora: LoraSection = LoraSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    conditioning: ConditioningSection = ConditioningSection()
    data: DataSection
    export: ExportSection = ExportSection()
    # After mode and data: its check reads them.
    validation: ValidationSection = ValidationSection()

    @field_validator("validation")
    @classmethod
    def _conditions_fit_the_mode(cls, value: ValidationSection, info: ValidationInfo) -> ValidationSection:
        """A condition the mode's LoRA never saw would make a meaningless sample: refuse it when loading."""
        mode, data, model = info.data.get("mode"), info.data.get("data"), info.data.get("model")
        if value.prompts and model is not None and model.checkpoint is not None and model.text_encoder is None:
            raise ValueError("prompts need model.text_encoder (a local Gemma 3 12B folder) to encode them")
        if mode is None:
            return value
        spec = MODE_SPECS[mode]
        takes_image = [name for name, s in MODE_SPECS.items() if s.first_frame]
        for index, item in enumerate(value.prompts):
            where = f"prompts.{index}"
            if item.image is not None and not spec.first_frame:
                raise ValueError(f"{where}.image = {item.image!r}: mode {mode!r} takes no first-frame image (modes "
                                 f"that do: {', '.join(takes_image)}); remove it or change the mode")
            if item.reference is not None and not spec.reference:
                raise ValueError(f"{where}.reference = {item.reference!r}: only mode 'ic-lora' takes a reference "
                                 f"video, the mode is {mode!r}")
            if item.reference is not None and data is not None and data.reference_temporal_scale != 1:
                raise ValueError(
                    f"{where}.reference: diffusers' LTX2InContextPipeline places a reference frame for frame "
                    f"(temporal scale 1), but data.reference_temporal_scale = {data.reference_temporal_scale}; "
                    f"such a LoRA cannot be sampled here: remove the reference or train with temporal scale 1"
                )
        return value

    @property
    def lora_alpha(self) -> float:
        return self.lora.alpha if self.lora.alpha is not None else float(self.lora.rank)

    @property
    def lora_targets(self) -> str | list[str]:
        """The resolved target spec: `auto` trains the modules of what the mode generates (AUTO_TARGETS)."""
        return AUTO_TARGETS[self.mode] if self.lora.targets == "auto" else self.lora.targets

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value); the value is read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.steps=100")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"--set {text!r}: the key before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc.problem})") from None
    return path, value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def _merge_under(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` wins; sections merge key by key."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_under(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The accepted keys of the section at `loc` (for 'did you mean' hints)."""
    model: type[BaseModel] = RunConfig
    for part in loc:
        if isinstance(part, int):  # an index into a list of sections, e.g. validation.prompts.0
            continue
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in loc)
        if item["type"] == "extra_forbidden":
            accepted = _fields_at(loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), accepted, n=1)
            did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
            lines.append(f"  {key}: unknown key{did_you_mean} accepted keys here: {', '.join(accepted)}")
        elif item["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            value = item.get("input")
            # A whole-section check already names its keys in the message.
            lines.append(f"  {key}: {message}" if isinstance(value, dict) else f"  {key} = {value!r}: {message}")
    return "\n".join(lines)


def resolve(raw: dict[str, Any], overrides: list[str] = (), source: str = "config") -> RunConfig:
    """Builds the validated config from a raw dict (from YAML), applying `--set` overrides and the recipe."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    user = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        _set_path(user, path, value)
    recipe = user.get("recipe")
    if recipe is not None:
        if recipe not in RECIPES:
            raise ConfigError(f"invalid configuration ({source}):\n  recipe = {recipe!r}: accepted: {', '.join(RECIPES)}")
        user = _merge_under(RECIPES[recipe], user)
    try:
        return RunConfig.model_validate(user)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return resolve(raw, overrides, source=str(path))
