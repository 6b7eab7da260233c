"""The cached-latent dataset format: one safetensors file per sample plus a manifest, written, checked and read.

Format, version 1. A cache is a directory holding `<name>.safetensors` files, a `manifest.json` and
`extras/empty_prompt.safetensors`.

Tensors of a sample file (float tensors may be stored in any float dtype; they are read as float32):
  video_latents       [128, F, H, W]  normalised video VAE latents: F latent frames, H x W latent rows x columns
  audio_latents       [8, T, 16]      optional; audio VAE latents, T latent steps (the trainer makes one 128-wide
                                      token per step, channels outermost); preprocessing makes T = round(F_pixels /
                                      fps * 25), the length the official pipelines generate (`audio_steps`)
  video_text_embeds   [L, Dv]         text embeddings as the transformer takes them (`encoder_hidden_states`)
  audio_text_embeds   [L, Da]         the same for the audio stream (`audio_encoder_hidden_states`)
  text_mask           [L]             integer; 1 = real token, 0 = padding
  video_loss_mask     [F, H, W]       optional; 1 = the latent carries loss, 0 = it does not (inpainting and
                                      outpainting masks)
  reference_latents   [128, F', H', W']  optional; the IC-LoRA reference (condition) video, normalised like
                                      video_latents, encoded at the sample's size divided by reference_downscale
                                      and keeping every reference_temporal_scale-th of its frames

Metadata of a sample file (safetensors metadata, all strings):
  ltx_lora_cache_version  "1"
  model_version           "2.3" or "2.0": the text embeddings are specific to one model version
  fps                     frame rate of the selected frames; audio/video alignment depends on it
  caption                 the caption the text embeddings encode
  num_frames, height, width   pixel size of the clip the latents come from
  reference_downscale, reference_temporal_scale   positive integers, present exactly when reference_latents is:
                          the spatial and temporal factors the reference was taken at (its positions depend on them)

`manifest.json`:
  {"ltx_lora_cache_version": 1, "model_version": "2.3",
   "samples": [{"file": "<name>.safetensors", "video_shape": [128, F, H, W], "audio_shape": [8, T, 16] or null,
                "text_len": L, "has_video_loss_mask": false, "reference_shape": [128, F', H', W'] or null,
                "reference_downscale": 1 or null, "reference_temporal_scale": 1 or null, "caption": "...",
                "fps": 24.0}, ...]}
It is written last, from the sample files' headers, so a cache without one is incomplete. Samples with equal
shapes (reference included), reference factors and fps can share a batch; the manifest alone says which.

`extras/empty_prompt.safetensors` (in a subfolder so it is never taken for a sample): the text tensors of the empty
caption, for caption dropout, with the shapes above; metadata ltx_lora_cache_version, model_version and
`fingerprint` (of the weights that encoded it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from trainer.io import write_atomic

CACHE_VERSION = 1
MANIFEST = "manifest.json"
VIDEO_CHANNELS = 128
AUDIO_CHANNELS = 8
AUDIO_MEL_BINS = 16
# Audio latents per second: 16 kHz, mel hop 160, 4x temporal compression in the audio VAE.
AUDIO_STEPS_PER_SECOND = 25
EMPTY_PROMPT = "extras/empty_prompt.safetensors"
TEXT_TENSORS = ("video_text_embeds", "audio_text_embeds", "text_mask")
REQUIRED_TENSORS = ("video_latents", *TEXT_TENSORS)
OPTIONAL_TENSORS = ("audio_latents", "video_loss_mask", "reference_latents")
REQUIRED_METADATA = ("model_version", "fps", "caption", "num_frames", "height", "width")
REFERENCE_METADATA = ("reference_downscale", "reference_temporal_scale")
_MODEL_NAMES = {"2.3": "LTX-2.3", "2.0": "LTX-2"}


class CacheError(ValueError):
    """A latent cache that cannot be trained on; the message names the file and the fix."""


def _model_name(version: str) -> str:
    return _MODEL_NAMES.get(version, f"model version {version!r}")


def audio_steps(num_frames: int, fps: float) -> int:
    """Audio latent steps of a clip of `num_frames` at `fps`, as the official pipelines size the audio they generate
    and conform encoded audio to (the VAE gives one step more for the mel frame at each edge)."""
    return round(num_frames / fps * AUDIO_STEPS_PER_SECOND)


def write_sample(cache_dir: str | Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Writes `<cache_dir>/<name>.safetensors`; metadata values are stored as strings, the format version added."""
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"sample name {name!r} must be a plain file name")
    missing = [k for k in REQUIRED_TENSORS if k not in tensors] + [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"sample {name!r} lacks {', '.join(missing)}")
    unknown = sorted(set(tensors) - set(REQUIRED_TENSORS) - set(OPTIONAL_TENSORS))
    if unknown:
        raise ValueError(f"sample {name!r} has unknown tensors {unknown}")
    if ("reference_latents" in tensors) != all(k in metadata for k in REFERENCE_METADATA):
        raise ValueError(f"sample {name!r}: reference_latents and the metadata {', '.join(REFERENCE_METADATA)} "
                         f"go together")
    return _save(Path(cache_dir) / f"{name}.safetensors", tensors, metadata)


def write_empty_prompt(cache_dir: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Writes `<cache_dir>/extras/empty_prompt.safetensors`, the empty caption's text tensors for caption dropout."""
    missing = [k for k in TEXT_TENSORS if k not in tensors] + [k for k in ("model_version", "fingerprint")
                                                               if k not in metadata]
    if missing or len(tensors) != len(TEXT_TENSORS):
        raise ValueError(f"the empty prompt needs exactly the tensors {', '.join(TEXT_TENSORS)} and the metadata "
                         f"model_version, fingerprint; got {sorted(tensors)} and {sorted(metadata)}")
    return _save(Path(cache_dir) / EMPTY_PROMPT, tensors, metadata)


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Atomically, metadata as strings with the format version added, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    strings = {key: str(value) for key, value in metadata.items()}
    strings["ltx_lora_cache_version"] = str(CACHE_VERSION)
    data = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    write_atomic(path, lambda tmp: save_file(data, tmp, metadata=strings))
    return path


def _read_header(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Tensor shapes and metadata of a sample file, without reading its data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
            metadata = f.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise CacheError(f"{path}: not a readable safetensors file ({exc})") from None
    return shapes, metadata


def _manifest_entry(path: Path, shapes: dict[str, list[int]], metadata: dict[str, str],
                    model_version: str) -> dict[str, Any]:
    """The manifest's record of one sample file, after the checks that need only its metadata."""
    has_reference = "reference_latents" in shapes
    _check_metadata(path, metadata, REQUIRED_METADATA + (REFERENCE_METADATA if has_reference else ()), model_version)
    try:
        fps = float(metadata["fps"])
    except ValueError:
        fps = math.nan
    if not (math.isfinite(fps) and fps > 0):
        raise CacheError(f"{path}: fps {metadata['fps']!r} is not a positive number")
    text_shape = shapes.get("text_mask", [])
    return {
        "file": path.name,
        "video_shape": shapes.get("video_latents"),
        "audio_shape": shapes.get("audio_latents"),
        "text_len": text_shape[0] if len(text_shape) == 1 else None,
        "has_video_loss_mask": "video_loss_mask" in shapes,
        "reference_shape": shapes.get("reference_latents"),
        "reference_downscale": _factor(path, metadata, "reference_downscale") if has_reference else None,
        "reference_temporal_scale": _factor(path, metadata, "reference_temporal_scale") if has_reference else None,
        "caption": metadata["caption"],
        "fps": fps,
    }


def _check_metadata(path: Path, metadata: dict[str, str], required: tuple[str, ...], model_version: str) -> None:
    """The metadata every cache file needs: its keys, this format version and the target's model version."""
    missing = [k for k in ("ltx_lora_cache_version", *required) if k not in metadata]
    if missing:
        raise CacheError(f"{path}: metadata lacks {', '.join(missing)}: re-run preprocessing")
    if metadata["ltx_lora_cache_version"] != str(CACHE_VERSION):
        raise CacheError(f"{path}: cache format version {metadata['ltx_lora_cache_version']!r}, this trainer reads "
                         f"{CACHE_VERSION}: re-run preprocessing")
    if metadata["model_version"] != model_version:
        raise CacheError(f"{path}: made for {_model_name(metadata['model_version'])} but the target is "
                         f"{_model_name(model_version)}: re-run preprocessing for this target")


def _factor(path: Path, metadata: dict[str, str], key: str) -> int:
    value = metadata[key]
    if not (value.isdigit() and int(value) >= 1):
        raise CacheError(f"{path}: {key} {value!r} is not a positive integer")
    return int(value)


def write_manifest(cache_dir: str | Path, model_version: str) -> Path:
    """Lists every sample file of `cache_dir` in `manifest.json` (replacing any old one) and returns its path."""
    cache_dir = Path(cache_dir)
    files = sorted(cache_dir.glob("*.safetensors"))
    manifest = {
        "ltx_lora_cache_version": CACHE_VERSION,
        "model_version": model_version,
        "samples": [_manifest_entry(path, *_read_header(path), model_version) for path in files],
    }
    path = cache_dir / MANIFEST
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))
    return path


def _check_shapes(path: Path, shapes: dict[str, list[int]], video_text_dim: int, audio_text_dim: int,
                  require_audio: bool) -> None:
    """The tensor shapes of one sample against the format and the target's text widths."""
    missing = [key for key in REQUIRED_TENSORS if key not in shapes]
    if missing:
        raise CacheError(f"{path}: lacks tensors {', '.join(missing)}: re-run preprocessing")
    video = shapes["video_latents"]
    if len(video) != 4 or video[0] != VIDEO_CHANNELS or min(video[1:]) < 1:
        raise CacheError(f"{path}: video_latents has shape {video}, expected [{VIDEO_CHANNELS}, F, H, W] with "
                         f"F, H, W >= 1")
    audio = shapes.get("audio_latents")
    if audio is None and require_audio:
        raise CacheError(f"{path}: has no audio_latents but the training mode generates audio: re-run "
                         f"preprocessing with audio, or train a video-only mode")
    if audio is not None and (len(audio) != 3 or audio[0] != AUDIO_CHANNELS or audio[2] != AUDIO_MEL_BINS
                              or audio[1] < 1):
        raise CacheError(f"{path}: audio_latents has shape {audio}, expected [{AUDIO_CHANNELS}, T, {AUDIO_MEL_BINS}] "
                         f"with T >= 1")
    _check_text_shapes(path, shapes, video_text_dim, audio_text_dim)
    loss_mask = shapes.get("video_loss_mask")
    if loss_mask is not None and loss_mask != video[1:]:
        raise CacheError(f"{path}: video_loss_mask has shape {loss_mask}, expected the latent grid {video[1:]}")
    reference = shapes.get("reference_latents")
    if reference is not None and (len(reference) != 4 or reference[0] != VIDEO_CHANNELS or min(reference[1:]) < 1):
        raise CacheError(f"{path}: reference_latents has shape {reference}, expected [{VIDEO_CHANNELS}, F', H', W'] "
                         f"with F', H', W' >= 1")


def _check_text_shapes(path: Path, shapes: dict[str, list[int]], video_text_dim: int, audio_text_dim: int) -> None:
    missing = [key for key in TEXT_TENSORS if key not in shapes]
    if missing:
        raise CacheError(f"{path}: lacks tensors {', '.join(missing)}: re-run preprocessing")
    mask = shapes["text_mask"]
    if len(mask) != 1 or mask[0] < 1:
        raise CacheError(f"{path}: text_mask has shape {mask}, expected [L] with L >= 1")
    for key, dim in (("video_text_embeds", video_text_dim), ("audio_text_embeds", audio_text_dim)):
        if len(shapes[key]) != 2 or shapes[key][0] != mask[0]:
            raise CacheError(f"{path}: {key} has shape {shapes[key]}, expected [{mask[0]}, D] (L from text_mask)")
        if shapes[key][1] != dim:
            raise CacheError(f"{path}: {key} is {shapes[key][1]} wide but the target takes {dim}: the text "
                             f"embeddings were made for another model, re-run preprocessing for this target")


class LatentCache(Dataset):
    """A latent cache opened for training: every sample's header is checked here, before the first step."""

    def __init__(self, cache_dir: str | Path, model_version: str, video_text_dim: int, audio_text_dim: int,
                 require_audio: bool, require_reference: bool = False):
        self.cache_dir = Path(cache_dir)
        self.model_version, self.video_text_dim, self.audio_text_dim = model_version, video_text_dim, audio_text_dim
        manifest = self._read_manifest(model_version)
        self.entries: list[dict[str, Any]] = manifest["samples"]
        if not self.entries:
            raise CacheError(f"{self.cache_dir / MANIFEST} lists no samples")
        for entry in self.entries:
            path = self.cache_dir / str(entry.get("file"))
            if not path.is_file():
                raise CacheError(f"{self.cache_dir / MANIFEST} lists {entry.get('file')!r}, which is missing: "
                                 f"re-run preprocessing")
            shapes, metadata = _read_header(path)
            actual = _manifest_entry(path, shapes, metadata, model_version)
            _check_shapes(path, shapes, video_text_dim, audio_text_dim, require_audio)
            if actual != entry:
                raise CacheError(f"{self.cache_dir / MANIFEST} does not match {path.name} (changed after the manifest "
                                 f"was written): re-run preprocessing")
        if require_reference:
            self._check_references()

    def _check_references(self) -> None:
        """IC-LoRA: every sample has a reference, all taken at the same factors (the LoRA records one pair)."""
        missing = [Path(entry["file"]).stem for entry in self.entries if entry["reference_shape"] is None]
        if missing:
            raise CacheError(f"mode ic-lora needs a reference video for every sample, but {len(missing)} of "
                             f"{len(self.entries)} in {self.cache_dir} have none (e.g. {', '.join(missing[:3])}): give "
                             f"each sample a reference (manifest column `reference`, or a `references/` folder beside "
                             f"a folder dataset) and re-run preprocessing")
        factors = {(entry["reference_downscale"], entry["reference_temporal_scale"]) for entry in self.entries}
        if len(factors) > 1:
            raise CacheError(f"{self.cache_dir}: references were taken at different (reference_downscale, "
                             f"reference_temporal_scale) factors {sorted(factors)}; a LoRA is trained at one pair: "
                             f"re-run preprocessing")

    def reference_factors(self) -> tuple[int, int]:
        """(downscale, temporal scale) of the references of a cache opened with `require_reference` (one pair)."""
        first = self.entries[0]
        return first["reference_downscale"], first["reference_temporal_scale"]

    def _read_manifest(self, model_version: str) -> dict[str, Any]:
        if not self.cache_dir.is_dir():
            raise CacheError(f"latent cache {str(self.cache_dir)!r} does not exist: preprocess your clips into it, "
                             f"or set data.synthetic to generate a synthetic one")
        path = self.cache_dir / MANIFEST
        if not path.is_file():
            raise CacheError(f"{path} is missing: the cache is incomplete (preprocessing writes the manifest "
                             f"last); re-run preprocessing")
        try:
            manifest = json.loads(path.read_text())
            version, samples = manifest["ltx_lora_cache_version"], manifest["samples"]
            cached_model = manifest["model_version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CacheError(f"{path} is not a valid manifest ({exc!r}): re-run preprocessing") from None
        if version != CACHE_VERSION:
            raise CacheError(f"{path}: cache format version {version!r}, this trainer reads {CACHE_VERSION}: re-run "
                             f"preprocessing")
        if cached_model != model_version:
            raise CacheError(f"{path}: cache was made for {_model_name(cached_model)} but the target is "
                             f"{_model_name(model_version)}: re-run preprocessing for this target")
        if not isinstance(samples, list) or not all(isinstance(entry, dict) for entry in samples):
            raise CacheError(f"{path}: 'samples' must be a list of objects: re-run preprocessing")
        return manifest

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        sample: dict[str, Any] = {"fps": entry["fps"], "name": Path(entry["file"]).stem}
        with safe_open(str(self.cache_dir / entry["file"]), framework="pt") as f:
            stored = set(f.keys())
            for key in (*REQUIRED_TENSORS, *OPTIONAL_TENSORS):
                if key in stored:
                    tensor = f.get_tensor(key)
                    sample[key] = tensor.long() if key == "text_mask" else tensor.float()
        if entry["reference_shape"] is not None:
            sample["reference_downscale"] = entry["reference_downscale"]
            sample["reference_temporal_scale"] = entry["reference_temporal_scale"]
        return sample

    def shape_key(self, index: int) -> tuple:
        """Samples with equal keys stack into one batch (same tensors, shapes, reference factors and fps); read from
        the manifest."""
        entry = self.entries[index]
        audio = tuple(entry["audio_shape"]) if entry["audio_shape"] is not None else None
        reference = tuple(entry["reference_shape"]) if entry["reference_shape"] is not None else None
        return (tuple(entry["video_shape"]), audio, entry["text_len"], entry["has_video_loss_mask"], entry["fps"],
                reference, entry["reference_downscale"], entry["reference_temporal_scale"])

    def tokens(self, index: int, video: bool = True, audio: bool = True, reference: bool = False) -> int:
        """The transformer's tokens for one sample, from the manifest: its text and the streams a mode uses."""
        entry = self.entries[index]
        counted = [(video, entry["video_shape"]), (reference, entry["reference_shape"])]
        return (sum(math.prod(shape[1:]) for used, shape in counted if used and shape)
                + (entry["audio_shape"][1] if audio and entry["audio_shape"] else 0) + entry["text_len"])

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """The empty caption's `video_text_embeds` [L, Dv], `audio_text_embeds` [L, Da] and `text_mask` [L], for
        caption dropout; checked against the target as the samples are."""
        path = self.cache_dir / EMPTY_PROMPT
        if not path.is_file():
            raise CacheError(f"{path} is missing (caption dropout needs it): re-run preprocessing, which writes it")
        shapes, metadata = _read_header(path)
        _check_metadata(path, metadata, ("model_version",), self.model_version)
        _check_text_shapes(path, shapes, self.video_text_dim, self.audio_text_dim)
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key).long() if key == "text_mask" else f.get_tensor(key).float()
                    for key in TEXT_TENSORS}
