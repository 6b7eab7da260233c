"""Reading media for preprocessing: probe and validate files, choose buckets, and load frames, audio and captions.

Frames come out as the video VAE takes them ([3, F, H, W] in [-1, 1], W and H multiples of 32, F = 8k+1 or 1 for
images), audio as the official LTX-2 log-mel features at 16 kHz. Every problem with a file is a MediaError naming
the file and the reason, so preprocessing can report it, skip the file and go on.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import av
import decord
import numpy as np
import torch
import torchaudio
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")

SAMPLE_RATE = 16000  # the audio VAE's rate
VFR_RATIO = 1.5  # longest over shortest frame interval above which a clip counts as variable frame rate
MAX_ASPECT_CHANGE = 2.0  # cropping to a bucket whose aspect differs more would lose over half the picture
AUTO_ASPECTS = ((1, 1), (4, 3), (3, 2), (16, 9))  # landscape; auto buckets add each one's portrait twin
AUTO_LATENT_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # k of F = 8k+1: roughly doubling clip lengths
_CHUNK = 8  # frames decoded at a time, so a long full-HD source never sits in memory whole

# Container signatures: a file that starts like a video container but cannot be opened is damaged, not foreign.
_CONTAINER_MAGIC = ((4, b"ftyp"), (0, b"\x1a\x45\xdf\xa3"), (0, b"RIFF"))


class MediaError(ValueError):
    """A media or caption file preprocessing cannot use, as "<path>: <reason>"; preprocessing reports it, skips the
    file and goes on."""


def _bucket_problem(width: int, height: int, frames: int) -> str | None:
    if width < 32 or height < 32 or width % 32 or height % 32:
        return "width and height must be multiples of 32 (the video VAE compresses 32x spatially)"
    if frames != 1 and (frames < 9 or (frames - 1) % 8):
        return "frames must be 1 (images) or 8k+1 such as 9, 17, 25 (the video VAE compresses 8x in time)"
    return None


@dataclass(frozen=True)
class Bucket:
    """A target size every sample in it is resized and cropped to, so its latents batch together."""

    width: int
    height: int
    frames: int

    def __post_init__(self):
        problem = _bucket_problem(self.width, self.height, self.frames)
        if problem:
            raise ValueError(f"invalid bucket {self}: {problem}")

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


def parse_bucket(text: str) -> Bucket:
    match = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", text)
    if not match:
        raise ValueError(f"invalid bucket {text!r}: expected WIDTHxHEIGHTxFRAMES, e.g. 768x512x121")
    width, height, frames = map(int, match.groups())
    problem = _bucket_problem(width, height, frames)
    if problem:
        raise ValueError(f"invalid bucket {text!r}: {problem}")
    return Bucket(width, height, frames)


@dataclass(frozen=True)
class MediaInfo:
    """What preprocessing needs to know about a file before decoding it; images have 1 frame, fps 0, duration 0."""

    path: Path
    kind: str  # "video" | "image"
    width: int
    height: int
    num_frames: int
    fps: float
    duration: float  # num_frames / fps: the last frame starts 1 / fps before the end
    has_audio: bool


def probe(path) -> MediaInfo:
    """Check that a file can be read the way read_frames and read_audio will read it, and say what it holds."""
    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _probe_image(path)
    if suffix in VIDEO_SUFFIXES:
        return _probe_video(path)
    raise MediaError(f"{path}: unsupported file type {suffix!r} (images: {', '.join(IMAGE_SUFFIXES)}; "
                     f"videos: {', '.join(VIDEO_SUFFIXES)})")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise MediaError(f"{path}: file is missing")
    if not path.is_file():
        raise MediaError(f"{path}: is not a file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: file is empty (0 bytes)")


def _open_image(path: Path) -> Image.Image:
    """The fully decoded image, upright (phones store rotation in EXIF), in RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except Image.UnidentifiedImageError:
        raise MediaError(f"{path}: is not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"{path}: image is truncated or corrupt ({e})") from None


def _probe_image(path: Path) -> MediaInfo:
    image = _open_image(path)
    return MediaInfo(path, "image", image.width, image.height, 1, 0.0, 0.0, has_audio=False)


def _open_container(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path))
    except av.error.FFmpegError as e:
        with open(path, "rb") as f:
            head = f.read(16)
        if any(head[at:at + len(magic)] == magic for at, magic in _CONTAINER_MAGIC):
            raise MediaError(f"{path}: file is truncated or corrupt ({e.strerror})") from None
        raise MediaError(f"{path}: is not a media file ({e.strerror})") from None


def _probe_video(path: Path) -> MediaInfo:
    with _open_container(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        codec = stream.codec_context.codec.canonical_name  # "av1", not the decoder "libdav1d"
        declared_frames, rate = stream.frames, stream.average_rate
        has_audio = bool(container.streams.audio)
        try:
            pts = sorted(p.pts for p in container.demux(stream) if p.size and p.pts is not None)
        except av.error.FFmpegError as e:
            raise MediaError(f"{path}: file is truncated or corrupt ({e.strerror})") from None
        times = np.array(pts, dtype=np.float64) * float(stream.time_base)
    if not len(times):
        raise MediaError(f"{path}: has no video frames")
    if declared_frames and len(times) < declared_frames:
        raise MediaError(f"{path}: file is truncated: {len(times)} of {declared_frames} frames present")
    intervals = np.diff(times)
    if len(intervals) >= 2 and (intervals.min() <= 0 or intervals.max() / intervals.min() > VFR_RATIO):
        raise MediaError(f"{path}: variable frame rate (frame intervals from {intervals.min() * 1000:.1f} to "
                         f"{intervals.max() * 1000:.1f} ms); re-encode it at a constant frame rate")
    if rate:
        fps = float(rate)
    elif len(times) > 1:
        fps = (len(times) - 1) / (times[-1] - times[0])
    else:
        raise MediaError(f"{path}: frame rate is unknown")

    try:
        reader = decord.VideoReader(str(path))
        num_frames = len(reader)
        if num_frames == 0:
            raise MediaError(f"{path}: has no decodable frames")
        first = reader[0].shape  # decoding the first and last frames proves the codec and the tail are readable
        reader[num_frames - 1]
    except (decord.DECORDError, RuntimeError) as e:
        raise MediaError(f"{path}: video codec {codec!r} cannot be decoded ({_decord_reason(e)})") from None
    return MediaInfo(path, "video", first[1], first[0], num_frames, fps, num_frames / fps, has_audio)


def _decord_reason(error: Exception) -> str:
    """decord's messages start with a time and a source path of its build; keep what follows."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", lines[0])[:200]


def _fits(info: MediaInfo, frames: int, target_fps: float, start: float = 0.0) -> bool:
    """Whether `frames` frames at target_fps from `start` stay within the clip: the last must not pass the last
    source frame (at (num_frames - 1) / fps), else it would repeat a frame and drift from the audio."""
    last_frame = (info.num_frames - 1) / info.fps
    return start >= 0 and start + (frames - 1) / target_fps <= last_frame + 1e-6


def _aspect_distance(width: int, height: int, bucket: Bucket) -> float:
    return abs(math.log(width / height) - math.log(bucket.width / bucket.height))


def choose_bucket(info: MediaInfo, buckets: list[Bucket], target_fps: float) -> Bucket:
    """The bucket of nearest aspect ratio among those the clip is long enough for; the longest, then largest, of
    equally near ones, so as much of the clip as possible is kept."""
    if info.kind == "image":
        candidates = [b for b in buckets if b.frames == 1]
        if not candidates:
            raise MediaError(f"{info.path}: no image bucket (F = 1) among {', '.join(map(str, buckets))}")
    else:
        video_buckets = [b for b in buckets if b.frames > 1]
        if not video_buckets:
            raise MediaError(f"{info.path}: no video bucket (F > 1) among {', '.join(map(str, buckets))}")
        candidates = [b for b in video_buckets if _fits(info, b.frames, target_fps)]
        if not candidates:
            shortest = min(b.frames for b in video_buckets)
            raise MediaError(f"{info.path}: too short for any bucket ({info.num_frames} frames at {info.fps:g} "
                             f"fps; shortest bucket needs {shortest} frames at {target_fps:g} fps)")
    best = min(candidates, key=lambda b: (_aspect_distance(info.width, info.height, b), -b.frames,
                                          -b.width * b.height))
    if _aspect_distance(info.width, info.height, best) > math.log(MAX_ASPECT_CHANGE):
        raise MediaError(f"{info.path}: aspect ratio {info.width / info.height:.3g} ({info.width}x{info.height}) "
                         f"is extreme: nearest bucket {best} differs by more than {MAX_ASPECT_CHANGE:g}x")
    return best


def auto_buckets(target_fps: float, max_pixels: int = 768 * 512, max_frames: int = 121) -> list[Bucket]:
    """Common aspect ratios at the largest size within max_pixels, each with frame counts 8k+1 from 9 to
    max_frames (roughly doubling, plus max_frames rounded down to 8k+1), and single-frame image buckets.

    Frame counts are in frames, not seconds, because the model's limits are; target_fps is only checked."""
    if target_fps <= 0:
        raise ValueError(f"target fps must be positive, got {target_fps}")
    if max_pixels < 32 * 32 or max_frames < 9:
        raise ValueError(f"auto buckets need max_pixels >= 1024 and max_frames >= 9, got {max_pixels} and "
                         f"{max_frames}")
    top = (max_frames - 1) // 8 * 8 + 1
    frame_counts = sorted({8 * k + 1 for k in AUTO_LATENT_STEPS if 8 * k + 1 <= top} | {top, 1})
    sizes = {}  # ordered set: tiny max_pixels can give two ratios the same size
    for aspect_w, aspect_h in AUTO_ASPECTS:
        width, height = _largest_size(aspect_w / aspect_h, max_pixels)
        sizes[width, height] = sizes[height, width] = None
    return [Bucket(w, h, f) for w, h in sizes for f in frame_counts]


def _largest_size(aspect: float, max_pixels: int) -> tuple[int, int]:
    """The tallest (width, height) in multiples of 32 near a landscape `aspect` with at most max_pixels pixels."""
    best = (32, 32)
    for height in range(32, max_pixels // 32 + 1, 32):
        width = round(aspect * height / 32) * 32
        if width * height <= max_pixels:
            best = (width, height)
    return best


def read_frames(info: MediaInfo, bucket: Bucket, target_fps: float, start: float = 0.0) -> torch.Tensor:
    """[3, F, H, W] float32 in [-1, 1]: `decode_frames` brought to the model's range."""
    return to_model_range(decode_frames(info, bucket, target_fps, start))


def decode_frames(info: MediaInfo, bucket: Bucket, target_fps: float, start: float = 0.0) -> torch.Tensor:
    """[F, H, W, 3] uint8: frame i is the source frame nearest to time start + i / target_fps, resized to cover the
    bucket and centre-cropped.

    Frames stay uint8 and are resized by the decoder (FFmpeg's scaler for clips, Pillow for images): converting to
    float here cost more CPU time than decoding, so that happens on the encoding device (`to_model_range`)."""
    if info.kind == "image":
        if bucket.frames != 1:
            raise MediaError(f"{info.path}: an image fills only single-frame buckets, not {bucket}")
        image = _open_image(info.path)
        size = _cover_size(image.width, image.height, bucket)
        if size != image.size:
            image = image.resize(size, Image.Resampling.BICUBIC)
        return _centre_crop(torch.from_numpy(np.array(image))[None], bucket)
    if not _fits(info, bucket.frames, target_fps, start):
        raise MediaError(f"{info.path}: too short for bucket {bucket} at {target_fps:g} fps from {start:g} s "
                         f"({info.num_frames} frames at {info.fps:g} fps)")
    width, height = _cover_size(info.width, info.height, bucket)
    try:
        # One decoder thread per clip: preprocessing decodes several clips at once (data.decode_threads).
        reader = decord.VideoReader(str(info.path), width=width, height=height, num_threads=1)
        timestamps = reader.get_frame_timestamp(range(len(reader)))[:, 0]
        wanted = start + np.arange(bucket.frames) / target_fps
        indices = np.abs(timestamps[None, :] - wanted[:, None]).argmin(axis=1).tolist()
        out = torch.empty(bucket.frames, bucket.height, bucket.width, 3, dtype=torch.uint8)
        for at in range(0, bucket.frames, _CHUNK):
            out[at:at + _CHUNK] = _centre_crop(torch.from_numpy(reader.get_batch(indices[at:at + _CHUNK]).asnumpy()),
                                               bucket)
    except (decord.DECORDError, RuntimeError) as e:
        raise MediaError(f"{info.path}: cannot decode frames ({_decord_reason(e)})") from None
    return out


def to_model_range(frames: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """[F, H, W, 3] uint8 -> [3, F, H, W] float32 in [-1, 1] on `device`."""
    return frames.to(device, non_blocking=True).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


def _cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """(width, height) scaled by the larger ratio, so the frame covers the bucket with no border."""
    scale = max(bucket.width / width, bucket.height / height)
    return max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale))


def _centre_crop(pixels: torch.Tensor, bucket: Bucket) -> torch.Tensor:
    """[N, h, w, 3] covering the bucket -> its centre [N, H, W, 3]."""
    top, left = (pixels.shape[1] - bucket.height) // 2, (pixels.shape[2] - bucket.width) // 2
    return pixels[:, top:top + bucket.height, left:left + bucket.width]


def read_audio(path, start: float, duration: float) -> torch.Tensor:
    """[2, round(duration * 16000)] float32: the file's audio from `start` for `duration` seconds (absolute time,
    as video timestamps), stereo (mono duplicated, more channels downmixed), zero-padded where the audio ends.
    Decodes from the file's start rather than seeking, which is exact for every format and cheap next to the VAE."""
    path = Path(path)
    _check_file(path)
    end = start + duration
    chunks, first_time = [], None
    with _open_container(path) as container:
        if not container.streams.audio:
            raise MediaError(f"{path}: has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.rate
        # Only the sample format changes here (and >2 channels are downmixed by FFmpeg's standard matrix); the
        # rate conversion is torchaudio's.
        layout = "stereo" if stream.channels > 2 else stream.layout.name
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        try:
            for frame in container.decode(stream):
                if first_time is None:
                    first_time = float(frame.time) if frame.time is not None else 0.0
                for converted in resampler.resample(frame):
                    chunks.append(converted.to_ndarray())
                if frame.time is not None and frame.time > end + 0.1:  # a little past the end for the resampler
                    break
        except av.error.FFmpegError as e:
            raise MediaError(f"{path}: audio is truncated or corrupt ({e.strerror})") from None
    length = round(duration * SAMPLE_RATE)
    out = torch.zeros(2, length)
    if not chunks:
        return out
    audio = torch.from_numpy(np.concatenate(chunks, axis=1)).float()
    audio = audio.repeat(2, 1) if audio.shape[0] == 1 else audio
    audio = torchaudio.functional.resample(audio, rate, SAMPLE_RATE)
    offset = round((start - first_time) * SAMPLE_RATE)  # where `start` falls in the decoded audio
    src_from, src_to = max(0, offset), min(audio.shape[1], offset + length)
    if src_to > src_from:
        out[:, src_from - offset:src_to - offset] = audio[:, src_from:src_to]
    return out


def log_mel(waveform: torch.Tensor) -> torch.Tensor:
    """The official LTX-2 audio features: [2, T, 64] log-mel of a [2, S] 16 kHz waveform, T = S // 160 + 1.

    The audio VAE encoder takes [batch, channels, time, mel bins] (diffusers' LTX2AudioEncoder.forward); this is
    that without the batch dimension."""
    if waveform.ndim != 2:
        raise ValueError(f"log_mel takes a [channels, samples] waveform, got shape {tuple(waveform.shape)}")
    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=1024, win_length=1024, hop_length=160, f_min=0, f_max=8000, n_mels=64,
        power=1.0, mel_scale="slaney", norm="slaney", center=True, pad_mode="reflect",
    ).to(waveform.device)
    mel = transform(waveform.float())  # [channels, 64, T]
    return torch.log(torch.clamp(mel, min=1e-5)).transpose(1, 2).contiguous()


def read_caption(media_path) -> str:
    """The caption in the same-stem .txt file next to the media, stripped."""
    media_path = Path(media_path)
    caption_path = media_path.with_suffix(".txt")
    if not caption_path.is_file():
        raise MediaError(f"{media_path}: caption file {caption_path} is missing")
    try:
        caption = caption_path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise MediaError(f"{media_path}: caption file {caption_path} is not UTF-8 "
                         f"({e.reason} at byte {e.start})") from None
    if not caption:
        raise MediaError(f"{media_path}: caption file {caption_path} is empty")
    return caption
