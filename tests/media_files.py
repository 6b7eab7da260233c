"""Real media files with known content for the media tests, written with PyAV and Pillow."""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

AUDIO_RATE = 48000  # the usual rate of camera audio; the reader must resample it to 16 kHz


def gray_frames(values, width=64, height=64) -> np.ndarray:
    """[N, H, W, 3] uint8 frames, frame k uniformly of brightness values[k]."""
    return np.stack([np.full((height, width, 3), v, np.uint8) for v in values])


def tone(freqs, seconds, channels=2, rate=AUDIO_RATE) -> np.ndarray:
    """[channels, samples] float32 sine; `freqs` is one frequency or (hz, until_seconds) pieces, the last to the end."""
    pieces = [(freqs, seconds)] if isinstance(freqs, (int, float)) else freqs
    t = np.arange(round(seconds * rate)) / rate
    hz = np.full_like(t, pieces[-1][0])
    for frequency, until in reversed(pieces[:-1]):
        hz[t < until] = frequency
    wave = 0.5 * np.sin(2 * np.pi * np.cumsum(hz) / rate)
    return np.repeat(wave[None].astype(np.float32), channels, axis=0)


def write_video(path: Path, frames: np.ndarray, fps: int = 24, audio: np.ndarray | None = None,
                codec: str = "libx264", pts_ms: list[int] | None = None, faststart: bool = False) -> Path:
    """Encode frames (and optional [C, S] float audio at AUDIO_RATE as AAC); `pts_ms` gives irregular timestamps,
    `faststart` puts the MP4 index first (so a cut file still opens)."""
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        if codec == "libx264":
            video.options = {"crf": "0", "preset": "ultrafast"}
        if pts_ms is not None:
            video.codec_context.time_base = video.time_base = Fraction(1, 1000)
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=AUDIO_RATE, layout="mono" if len(audio) == 1 else "stereo")
        for k, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[k], Fraction(1, 1000)
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if sound is not None:
            samples = np.ascontiguousarray(audio.T.reshape(1, -1) if len(audio) > 1 else audio)
            frame = av.AudioFrame.from_ndarray(samples, format="flt", layout=sound.layout.name)
            frame.sample_rate, frame.pts = AUDIO_RATE, 0
            container.mux(sound.encode(frame))
            container.mux(sound.encode())
    return path


def write_audio(path: Path, audio: np.ndarray, rate: int = AUDIO_RATE) -> Path:
    """A separate 16-bit PCM audio file (.wav) of [C, S] float audio, C = 1, 2 or 6 (5.1)."""
    layout = {1: "mono", 2: "stereo", 6: "5.1"}[len(audio)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout=layout)
        pcm = np.ascontiguousarray((audio.T * 32767).astype(np.int16).reshape(1, -1))
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_video_without_frames(path: Path) -> Path:
    """A Matroska file that declares an H.264 video stream but holds only audio packets."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=24)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        sound = container.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 2 * 4800), np.float32), format="flt", layout="stereo")
        frame.sample_rate, frame.pts = AUDIO_RATE, 0
        container.mux(sound.encode(frame))
        container.mux(sound.encode())
    return path
