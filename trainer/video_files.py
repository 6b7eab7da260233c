"""Writing rendered samples: MP4 files (H.264 yuv420p video, AAC audio) through PyAV, and animated GIF previews.

MP4 files are written atomically (a temporary name in the same folder, then a rename), so a crash or a reader never
sees half a video under the final name.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from trainer.io import write_atomic

# x264's constant-quality setting: visually lossless for previews at a modest size.
H264_CRF = 18
AAC_BITRATE = 192_000


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, audio: np.ndarray | None = None,
              sample_rate: int | None = None) -> None:
    """frames [F, H, W, 3] uint8 (H, W even); audio [channels, samples] float in [-1, 1] at `sample_rate`, or None
    for a silent file."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if audio is not None and (audio.ndim != 2 or sample_rate is None):
        raise ValueError(f"audio must be [channels, samples] with a sample rate, got {tuple(audio.shape)}")
    write_atomic(path, lambda tmp: _encode(tmp, frames, fps, audio, sample_rate))


def _encode(path: str, frames: np.ndarray, fps: float, audio: np.ndarray | None, sample_rate: int | None) -> None:
    with av.open(path, "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt = "yuv420p"
        video.options = {"crf": str(H264_CRF)}
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=sample_rate)
            sound.layout = "stereo" if audio.shape[0] == 2 else "mono"
            sound.bit_rate = AAC_BITRATE
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode(None))
        if sound is not None:
            planar = np.ascontiguousarray(np.clip(audio, -1.0, 1.0), dtype=np.float32)
            chunk = av.AudioFrame.from_ndarray(planar, format="fltp", layout=sound.layout.name)
            chunk.sample_rate = sample_rate
            chunk.pts = 0  # from zero: the muxer's edit list then hides the encoder's priming samples, keeping A/V sync
            container.mux(sound.encode(chunk))
            container.mux(sound.encode(None))


def gif_bytes(frames: np.ndarray, fps: float, max_height: int = 256) -> bytes:
    """An animated GIF of frames [F, H, W, 3] uint8, scaled down by a whole factor to at most `max_height` pixels
    high, looping; what TensorBoard shows as an image summary."""
    factor = max(1, -(-frames.shape[1] // max_height))
    images = [Image.fromarray(frame).reduce(factor) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buffer.getvalue()
