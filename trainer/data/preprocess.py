"""Media and captions into the latent cache: discovery, buckets, encoding, fingerprints, the report.

Two passes. The first is cheap: find the samples, probe each file, choose its bucket and compute its fingerprint
(model weights, bucket, fps, caption with trigger word, the media files' size and time). Bad files are reported and
skipped there, before any model is loaded. The second encodes only samples whose cache file is missing or has another
fingerprint, so a re-run skips finished work and a changed setting re-encodes exactly the affected samples. Files
are written atomically and the manifest last, so an interrupted run leaves a cache the next run completes.
Under `accelerate launch` each process encodes its share; the main process writes the manifest.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from trainer.config import AUDIO_MODES, ConfigError, RunConfig
from trainer.data import media
from trainer.data.cache import CACHE_VERSION, CacheError, write_manifest, write_sample
from trainer.io import write_atomic
from trainer.models.components import components_identity, encode_audio, encode_video, load_components
from trainer.models.registry import get_target

logger = logging.getLogger("ltx_lora")
REPORT = "preprocess_report.json"


@dataclass
class Item:
    """One sample of the dataset as the user described it."""

    name: str
    media: Path
    caption: str | None = None  # None: read the same-stem .txt
    audio: Path | None = None  # a separate soundtrack; None: the clip's own


@dataclass
class Planned:
    item: Item
    info: media.MediaInfo
    bucket: media.Bucket
    caption: str
    fingerprint: str


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
    """The samples of a media folder or a CSV / JSONL manifest (columns `media`, `caption`, optional `audio`)."""
    if not source.exists():
        raise ConfigError(f"data source {str(source)!r} does not exist; give a media folder or a CSV/JSONL manifest")
    if source.is_dir():
        suffixes = media.VIDEO_SUFFIXES + media.IMAGE_SUFFIXES
        items = [Item(p.stem, p) for p in sorted(source.iterdir()) if p.suffix.lower() in suffixes]
    elif source.suffix.lower() in (".csv", ".jsonl"):
        items = _read_manifest(source)
    else:
        raise ConfigError(f"data source {source}: expected a folder, or a manifest ending in .csv or .jsonl")
    names = Counter(item.name for item in items)
    for item in items:
        if names[item.name] > 1:
            report.skip(item.media, f"another file is also named {item.name!r}; sample names must be unique")
    return [item for item in items if names[item.name] == 1]


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
            raise ConfigError(f"manifest {path}, row {number}: needs a 'media' column (and 'caption', optional 'audio')")
        file = (path.parent / row["media"]).resolve()
        audio = (path.parent / row["audio"]).resolve() if row.get("audio") else None
        items.append(Item(file.stem, file, row.get("caption") or None, audio))
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
        "target": cfg.model.target,
        "weights": identity,
        "bucket": str(bucket),
        "fps": cfg.data.fps,
        "caption": caption,
        "files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _cached_fingerprint(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except (OSError, SafetensorError):
        return None


def plan(cfg: RunConfig, source: Path, report: Report) -> list[Planned]:
    """The first pass: probe, bucket, caption and fingerprint every sample; report and drop what cannot be used."""
    buckets = (media.auto_buckets(cfg.data.fps, cfg.data.max_pixels, cfg.data.max_frames)
               if cfg.data.buckets == "auto" else [media.parse_bucket(b) for b in cfg.data.buckets])
    needs_audio = cfg.mode in AUDIO_MODES
    identity = components_identity(cfg)
    planned = []
    for item in discover(source, report):
        try:
            info = media.probe(item.media)
            if needs_audio and item.audio is None and not info.has_audio:
                raise media.MediaError(f"{item.media}: has no audio stream, and mode {cfg.mode} trains audio")
            bucket = media.choose_bucket(info, buckets, cfg.data.fps)
            caption = item.caption if item.caption is not None else media.read_caption(item.media)
        except media.MediaError as exc:
            report.skip(item.media, str(exc).removeprefix(f"{item.media}: "))
            continue
        caption = _with_trigger(caption, cfg.trigger_word)
        planned.append(Planned(item, info, bucket, caption, _fingerprint(cfg, identity, item, bucket, caption)))
    return planned


def _encode_sample(p: Planned, cfg: RunConfig, components, text_cache: dict[str, dict[str, torch.Tensor]]) -> dict:
    frames = media.read_frames(p.info, p.bucket, cfg.data.fps)
    tensors = {"video_latents": encode_video(components.video_vae, frames)}
    if p.info.has_audio or p.item.audio is not None:
        # Exactly the time span of the selected frames, so sound and picture stay aligned.
        waveform = media.read_audio(p.item.audio or p.item.media, 0.0, p.bucket.frames / cfg.data.fps)
        tensors["audio_latents"] = encode_audio(components.audio_vae, media.log_mel(waveform))
    if p.caption not in text_cache:
        text_cache[p.caption] = {k: v[0].cpu() for k, v in components.prompt_encoder.encode([p.caption]).items()}
    tensors.update(text_cache[p.caption])
    return tensors


def preprocess(cfg: RunConfig, source: str | None = None, progress: bool = True) -> Report:
    """Brings `data.cache_dir` up to date with the dataset; returns (and writes) the report."""
    source = source or cfg.data.source
    if source is None:
        raise ConfigError("no data to preprocess: set data.source in the config or pass --data DIR_OR_MANIFEST")
    state = PartialState()
    if cfg.data.demo and not Path(source).exists():
        if state.is_main_process:
            from trainer.data.demo import write_demo_dataset

            write_demo_dataset(source)
        state.wait_for_everyone()
    cache_dir = Path(cfg.data.cache_dir)
    target = get_target(cfg.model.target)
    report = Report(source=str(source))
    planned = plan(cfg, Path(source), report)
    if not planned:
        raise CacheError(f"no usable samples in {source}: {len(report.skipped)} skipped\n{report.summary()}")

    todo = [p for p in planned if _cached_fingerprint(cache_dir / f"{p.item.name}.safetensors") != p.fingerprint]
    report.reused = len(planned) - len(todo)
    mine = todo[state.process_index :: state.num_processes]
    if mine:
        components = load_components(cfg, state.device)
        text_cache: dict[str, dict[str, torch.Tensor]] = {}
        bar = tqdm(mine, desc="preprocess", unit="sample", disable=not (progress and state.is_main_process))
        for p in bar:
            bar.set_postfix_str(p.item.name)
            try:
                tensors = _encode_sample(p, cfg, components, text_cache)
            except media.MediaError as exc:
                report.skip(p.item.media, str(exc).removeprefix(f"{p.item.media}: "))
                continue
            write_sample(cache_dir, p.item.name, tensors, {
                "model_version": target.version,
                "fps": cfg.data.fps,
                "caption": p.caption,
                "num_frames": p.bucket.frames,
                "height": p.bucket.height,
                "width": p.bucket.width,
                "fingerprint": p.fingerprint,
            })
            report.encoded += 1
    state.wait_for_everyone()

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
