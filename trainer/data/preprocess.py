"""Media and captions into the latent cache: discovery, buckets, encoding, fingerprints, the report.

Two passes. The first is cheap: find the samples, probe each file, choose its bucket and compute its fingerprint
(model weights, bucket, fps, caption with trigger word, the size and time of the media, reference and mask files,
the reference factors). Bad files are reported and skipped there, before any model is loaded. The second encodes
only samples whose cache file is missing or has another fingerprint, so a re-run skips finished work and a changed
setting re-encodes exactly the affected samples. Files are written atomically and the manifest last, so an
interrupted run leaves a cache the next run completes. The empty caption's text embedding is cached once (for
caption dropout) and re-encoded only when the weights change.
Under `accelerate launch` each process encodes its share; the main process writes the manifest.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from trainer.config import AUDIO_MODES, ConfigError, RunConfig
from trainer.data import media
from trainer.data.cache import (
    CACHE_VERSION,
    EMPTY_PROMPT,
    CacheError,
    audio_steps,
    write_empty_prompt,
    write_manifest,
    write_sample,
)
from trainer.io import digest, file_identity, write_atomic
from trainer.models.components import (
    Components,
    components_identity,
    encode_audio,
    encode_video,
    load_components,
)
from trainer.models.registry import get_target
from trainer.modes import MODE_SPECS

logger = logging.getLogger("ltx_lora")
REPORT = "preprocess_report.json"
# Raised whenever the same inputs would encode differently, so caches made before re-encode (2: frames resized by the
# decoder, audio latents conformed to the official length).
ENCODING_REVISION = 2
# How far (log of the ratio) a reference's aspect ratio may be from its sample's: about 2%, rounding of even sizes.
ASPECT_TOLERANCE = 0.02


@dataclass
class Item:
    """One sample of the dataset as the user described it."""

    name: str
    media: Path
    caption: str | None = None  # None: read the same-stem .txt
    audio: Path | None = None  # a separate soundtrack; None: the clip's own
    reference: Path | None = None  # an IC-LoRA reference (condition) video or image
    mask: Path | None = None  # white = the loss applies there


@dataclass
class Planned:
    item: Item
    info: media.MediaInfo
    bucket: media.Bucket
    caption: str
    fingerprint: str
    reference: media.MediaInfo | None = None
    reference_bucket: media.Bucket | None = None
    mask: media.MediaInfo | None = None


@dataclass
class Report:
    source: str
    samples: int = 0
    encoded: int = 0
    reused: int = 0
    seconds_of_video: float = 0.0
    per_bucket: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def skip(self, path: Path | str, reason: str) -> None:
        self.skipped.append({"file": str(path), "reason": reason})

    def summary(self) -> str:
        lines = [f"{self.samples} samples ({self.encoded} encoded, {self.reused} reused), "
                 f"{self.seconds_of_video:.1f} s of video, {len(self.skipped)} skipped"]
        lines += [f"  {bucket}: {count}" for bucket, count in sorted(self.per_bucket.items())]
        lines += [f"  skipped {s['file']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def discover(source: Path, report: Report) -> list[Item]:
    """The samples of a media folder or a CSV / JSONL manifest (columns `media`, `caption`, optional `audio`,
    `reference`, `mask`)."""
    if not source.exists():
        raise ConfigError(f"data source {str(source)!r} does not exist; give a media folder or a CSV/JSONL manifest")
    if source.is_dir():
        suffixes = media.VIDEO_SUFFIXES + media.IMAGE_SUFFIXES
        items = [Item(p.stem, p, reference=_beside(source / "references", p.stem, suffixes),
                      mask=_beside(source / "masks", p.stem, suffixes))
                 for p in sorted(source.iterdir()) if p.suffix.lower() in suffixes]
    elif source.suffix.lower() in (".csv", ".jsonl"):
        items = _read_manifest(source)
    else:
        raise ConfigError(f"data source {source}: expected a folder, or a manifest ending in .csv or .jsonl")
    names = Counter(item.name for item in items)
    for item in items:
        if names[item.name] > 1:
            report.skip(item.media, f"another file is also named {item.name!r}; sample names must be unique")
    return [item for item in items if names[item.name] == 1]


def _beside(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    """A folder dataset's reference or mask for the sample `stem`: the same-stem media file in `references/` or
    `masks/`, if there is one."""
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.glob(f"{glob.escape(stem)}.*") if p.suffix.lower() in suffixes)
    if len(found) > 1:
        raise ConfigError(f"{folder} holds {len(found)} files for sample {stem!r} ({', '.join(p.name for p in found)}); "
                          f"keep one")
    return found[0] if found else None


def _read_manifest(path: Path) -> list[Item]:
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise ConfigError(f"manifest {path} cannot be read: {exc}") from None
    items = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("media"):
            raise ConfigError(f"manifest {path}, row {number}: needs a 'media' column (and 'caption', optional "
                              f"'audio', 'reference', 'mask')")
        file, audio, reference, mask = ((path.parent / row[key]).resolve() if row.get(key) else None
                                        for key in ("media", "audio", "reference", "mask"))
        items.append(Item(file.stem, file, row.get("caption") or None, audio, reference, mask))
    return items


def _with_trigger(caption: str, trigger: str | None) -> str:
    """Puts the trigger word first unless the caption already has it."""
    if not trigger or trigger in caption:
        return caption
    return f"{trigger}, {caption}"


def _fingerprint(cfg: RunConfig, identity: str, item: Item, bucket: media.Bucket, caption: str) -> str:
    files = [item.media] + ([item.audio] if item.audio else [])
    described = {
        "cache_version": CACHE_VERSION,
        "encoding": ENCODING_REVISION,
        "target": cfg.model.target,
        "weights": identity,
        "bucket": str(bucket),
        "fps": cfg.data.fps,
        "caption": caption,
        "files": [file_identity(p) for p in files],
    }
    # Only samples with a reference or mask depend on them: other samples keep their fingerprints.
    if item.reference:
        described["reference"] = file_identity(item.reference)
        described["reference_scale"] = [cfg.data.reference_downscale, cfg.data.reference_temporal_scale]
    if item.mask:
        described["mask"] = file_identity(item.mask)
    return digest(described)


def _empty_prompt_fingerprint(cfg: RunConfig) -> str:
    described = {"cache_version": CACHE_VERSION, "target": cfg.model.target, "weights": components_identity(cfg)}
    return digest(described)


def _cached_fingerprint(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except (OSError, SafetensorError):
        return None


def plan(cfg: RunConfig, source: Path, report: Report) -> list[Planned]:
    """The first pass: probe, bucket, caption and fingerprint every sample; report and drop what cannot be used.
    Files are probed on `data.decode_threads` threads (probing is I/O and FFmpeg, which release the GIL)."""
    buckets = (media.auto_buckets(cfg.data.fps, cfg.data.max_pixels, cfg.data.max_frames)
               if cfg.data.buckets == "auto" else [media.parse_bucket(b) for b in cfg.data.buckets])
    identity = components_identity(cfg)
    items = discover(source, report)
    with ThreadPoolExecutor(cfg.data.decode_threads) as pool:
        outcomes = list(pool.map(lambda item: _plan_sample(cfg, item, buckets, identity), items))
    planned = []
    for item, outcome in zip(items, outcomes):
        if isinstance(outcome, media.MediaError):
            report.skip(item.media, str(outcome).removeprefix(f"{item.media}: "))
        else:
            planned.append(outcome)
    return planned


def _plan_sample(cfg: RunConfig, item: Item, buckets: list[media.Bucket], identity: str) -> Planned | media.MediaError:
    """One sample's plan, or the reason it cannot be used."""
    try:
        info = media.probe(item.media)
        if cfg.mode in AUDIO_MODES and item.audio is None and not info.has_audio:
            raise media.MediaError(f"{item.media}: has no audio stream, and mode {cfg.mode} trains audio")
        bucket = media.choose_bucket(info, buckets, cfg.data.fps)
        caption = item.caption if item.caption is not None else media.read_caption(item.media)
        reference = reference_bucket = mask = None
        if MODE_SPECS[cfg.mode].reference and not item.reference:
            raise media.MediaError(f"{item.media}: has no reference video, and mode {cfg.mode} trains on pairs")
        if item.reference:
            reference = _probe_as("reference", item.reference)
            if reference.kind != info.kind:
                raise media.MediaError(f"reference {item.reference}: {reference.kind} reference for a {info.kind} "
                                       f"sample; both must be videos or both images")
            if abs(math.log(reference.width * info.height / (reference.height * info.width))) > ASPECT_TOLERANCE:
                raise media.MediaError(f"reference {item.reference}: is {reference.width}x{reference.height}, "
                                       f"another aspect ratio than the sample's {info.width}x{info.height}; "
                                       f"cropped alike they would not show the same region")
            reference_bucket = _reference_bucket(bucket, cfg.data.reference_downscale,
                                                 cfg.data.reference_temporal_scale)
        if item.mask:
            mask = _probe_as("mask", item.mask)
    except media.MediaError as exc:
        return exc
    caption = _with_trigger(caption, cfg.trigger_word)
    return Planned(item, info, bucket, caption, _fingerprint(cfg, identity, item, bucket, caption), reference,
                   reference_bucket, mask)


def _probe_as(role: str, path: Path) -> media.MediaInfo:
    """Probes a reference or mask file; the report lists the sample's media, so the reason says which file failed."""
    try:
        return media.probe(path)
    except media.MediaError as exc:
        raise media.MediaError(f"{role} {exc}") from None


def _reference_bucket(bucket: media.Bucket, downscale: int, temporal_scale: int) -> media.Bucket:
    """The reference's size: the bucket's width and height over `downscale`, every `temporal_scale`-th frame. The VAE
    takes only multiples of 32 and 8j+1 frames, so other combinations are refused rather than rounded."""
    width, height = bucket.width / downscale, bucket.height / downscale
    if bucket.width % (32 * downscale) or bucket.height % (32 * downscale):
        raise media.MediaError(f"reference: bucket {bucket} with data.reference_downscale={downscale} gives "
                               f"{width:g}x{height:g}, but width and height must be multiples of 32")
    if (bucket.frames - 1) % (8 * temporal_scale):
        raise media.MediaError(f"reference: bucket {bucket} with data.reference_temporal_scale={temporal_scale} gives "
                               f"{(bucket.frames - 1) / temporal_scale + 1:g} frames, but frames must be 8j+1")
    return media.Bucket(int(width), int(height), (bucket.frames - 1) // temporal_scale + 1)


@dataclass
class Decoded:
    """One sample's pixels (uint8 [F, H, W, 3], see media.decode_frames) and sound, ready for the encoders."""

    frames: torch.Tensor
    loss_mask: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    mel: torch.Tensor | None = None


def _decode_sample(p: Planned, cfg: RunConfig) -> Decoded:
    """The CPU half of a sample: decoding, resizing, masks and audio features."""
    # The mask first: one that selects nothing skips the sample before anything else is decoded.
    loss_mask = _latent_mask(p.mask, p.bucket, cfg.data.fps) if p.mask is not None else None
    decoded = Decoded(media.decode_frames(p.info, p.bucket, cfg.data.fps), loss_mask)
    if p.reference is not None:
        # At fps / k, reference frame j is taken at time j * k / fps: every k-th of the sample's frames, same span.
        try:
            decoded.reference = media.decode_frames(p.reference, p.reference_bucket,
                                                    cfg.data.fps / cfg.data.reference_temporal_scale)
        except media.MediaError as exc:
            raise media.MediaError(f"reference {exc}") from None
    if p.info.has_audio or p.item.audio is not None:
        # Exactly the time span of the selected frames, so sound and picture stay aligned.
        waveform = media.read_audio(p.item.audio or p.item.media, 0.0, p.bucket.frames / cfg.data.fps)
        decoded.mel = media.log_mel(waveform)
    return decoded


def _decoded_ahead(samples: list[Planned], cfg: RunConfig) -> Iterator[tuple[Planned, Decoded | media.MediaError]]:
    """Yields each sample decoded, in order, while the next ones decode on CPU threads: decord, PyAV and torch
    release the GIL, so decoding overlaps the encoding of the samples before them on the GPU."""
    workers = cfg.data.decode_threads
    with ThreadPoolExecutor(workers) as pool:
        pending = deque((p, pool.submit(_decode_sample, p, cfg)) for p in samples[:workers])
        upcoming = iter(samples[workers:])
        while pending:
            p, future = pending.popleft()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, pool.submit(_decode_sample, following, cfg)))
            try:
                yield p, future.result()
            except media.MediaError as exc:
                yield p, exc


def _encode_sample(p: Planned, decoded: Decoded, components, text_cache: dict[str, dict[str, torch.Tensor]],
                   fps: float) -> dict:
    """The GPU half: pixels to the model's range on the GPU, VAEs, the prompt encoder (each distinct caption once)."""
    device = components.video_vae.device
    tensors = {"video_latents": encode_video(components.video_vae, media.to_model_range(decoded.frames, device))}
    if decoded.loss_mask is not None:
        tensors["video_loss_mask"] = decoded.loss_mask
    if decoded.reference is not None:
        tensors["reference_latents"] = encode_video(components.video_vae, media.to_model_range(decoded.reference,
                                                                                              device))
    if decoded.mel is not None:
        # Conformed to the official length for the clip's duration, the length generation works at.
        steps = audio_steps(p.bucket.frames, fps)
        latents = encode_audio(components.audio_vae, decoded.mel)
        if latents.shape[1] < steps:
            raise RuntimeError(f"{p.item.media}: the audio VAE gave {latents.shape[1]} latent steps for "
                               f"{p.bucket.frames / fps:.3f} s, fewer than the {steps} expected")
        tensors["audio_latents"] = latents[:, :steps].contiguous()
    if p.caption not in text_cache:
        text_cache[p.caption] = {k: v[0].cpu() for k, v in components.prompt_encoder.encode([p.caption]).items()}
    tensors.update(text_cache[p.caption])
    return tensors


def _latent_mask(mask: media.MediaInfo, bucket: media.Bucket, fps: float) -> torch.Tensor:
    """[F', H', W'] 0/1 on the latent grid: a cell carries loss when at least half of its pixels are white. The mask
    is cropped and sampled in time as the sample's frames are, so it stays aligned with them; an image mask holds
    for every frame."""
    try:
        if mask.kind == "image":
            pixels = media.read_frames(mask, media.Bucket(bucket.width, bucket.height, 1), fps)
        else:
            pixels = media.read_frames(mask, bucket, fps)
    except media.MediaError as exc:
        raise media.MediaError(f"mask {exc}") from None
    white = (pixels.mean(0) > 0).float()  # brighter than mid-grey (pixels are in [-1, 1]); [F, H, W], F = 1 for images
    frames, height, width = white.shape
    cells = white.view(frames, height // 32, 32, width // 32, 32).mean((2, 4))
    # The VAE's first latent frame encodes pixel frame 0 alone, every later one the next 8 frames.
    cells = torch.cat([cells[:1], cells[1:].view(-1, 8, height // 32, width // 32).mean(1)])
    selected = (cells >= 0.5).float().expand((bucket.frames - 1) // 8 + 1, -1, -1).contiguous()
    if not selected.any():
        raise media.MediaError(f"mask {mask.path}: mask selects nothing (no latent cell of 32x32 pixels and 8 frames "
                               f"is at least half white)")
    return selected


def preprocess(cfg: RunConfig, source: str | None = None, progress: bool = True,
               components: Components | None = None) -> Report:
    """Brings `data.cache_dir` up to date with the dataset; returns (and writes) the report.

    `components` replaces the ones the config names (benchmarks build full-size random ones)."""
    source = source or cfg.data.source
    if source is None:
        raise ConfigError("no data to preprocess: set data.source in the config or pass --data DIR_OR_MANIFEST")
    state = PartialState()
    if cfg.data.demo:
        # Every process looks before the main one may start writing, and all pass the same barriers: a process that
        # looked once the folder existed would otherwise skip the barrier below and read half a dataset.
        missing = not Path(source).exists()
        state.wait_for_everyone()
        if missing and state.is_main_process:
            from trainer.data.demo import write_demo_dataset

            write_demo_dataset(source)
        state.wait_for_everyone()
    cache_dir = Path(cfg.data.cache_dir)
    if state.is_main_process and cache_dir.is_dir():
        for leftover in cache_dir.glob(".*.tmp"):  # from a run that was killed while writing
            leftover.unlink()
    state.wait_for_everyone()
    target = get_target(cfg.model.target)
    report = Report(source=str(source))
    planned = plan(cfg, Path(source), report)
    if not planned:
        raise CacheError(f"no usable samples in {source}: {len(report.skipped)} skipped\n{report.summary()}")

    todo = [p for p in planned if _cached_fingerprint(cache_dir / f"{p.item.name}.safetensors") != p.fingerprint]
    report.reused = len(planned) - len(todo)
    mine = todo[state.process_index :: state.num_processes]
    empty_fingerprint = _empty_prompt_fingerprint(cfg)
    needs_empty = state.is_main_process and _cached_fingerprint(cache_dir / EMPTY_PROMPT) != empty_fingerprint
    if (mine or needs_empty) and components is None:
        components = load_components(cfg, state.device)
    if needs_empty:
        empty = {k: v[0].cpu() for k, v in components.prompt_encoder.encode([""]).items()}
        write_empty_prompt(cache_dir, empty, {"model_version": target.version, "fingerprint": empty_fingerprint})
    if mine:
        text_cache: dict[str, dict[str, torch.Tensor]] = {}
        bar = tqdm(total=len(mine), desc="preprocess", unit="sample", disable=not (progress and state.is_main_process))
        for p, decoded in _decoded_ahead(mine, cfg):
            bar.update(1)
            bar.set_postfix_str(p.item.name)
            if isinstance(decoded, media.MediaError):
                report.skip(p.item.media, str(decoded).removeprefix(f"{p.item.media}: "))
                continue
            tensors = _encode_sample(p, decoded, components, text_cache, cfg.data.fps)
            metadata = {
                "model_version": target.version,
                "fps": cfg.data.fps,
                "caption": p.caption,
                "num_frames": p.bucket.frames,
                "height": p.bucket.height,
                "width": p.bucket.width,
                "fingerprint": p.fingerprint,
            }
            if p.reference is not None:
                metadata["reference_downscale"] = cfg.data.reference_downscale
                metadata["reference_temporal_scale"] = cfg.data.reference_temporal_scale
            write_sample(cache_dir, p.item.name, tensors, metadata)
            report.encoded += 1
        bar.close()
    state.wait_for_everyone()
    if state.num_processes > 1:  # every process's skips and counts, for the report and the cleanup
        report.skipped = gather_object(report.skipped)
        report.encoded = sum(gather_object([report.encoded]))

    if state.is_main_process:
        failed = {s["file"] for s in report.skipped}
        kept = [p for p in planned if str(p.item.media) not in failed]
        _remove_stale(cache_dir, {p.item.name for p in kept})
        write_manifest(cache_dir, target.version)
        report.samples = len(kept)
        report.per_bucket = dict(Counter(str(p.bucket) for p in kept))
        report.seconds_of_video = sum(p.bucket.frames / cfg.data.fps for p in kept if p.bucket.frames > 1)
        text = json.dumps(report.__dict__, indent=1)
        write_atomic(cache_dir / REPORT, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    return report


def _remove_stale(cache_dir: Path, names: set[str]) -> None:
    """Sample files of media no longer in the dataset would otherwise stay in the manifest."""
    for path in cache_dir.glob("*.safetensors"):
        if path.stem not in names:
            path.unlink()
