"""Media reading on real files: probing, bucket choice, frame resampling and cropping, audio, log-mel, refusals."""

import math
import pickle
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torchaudio
from PIL import Image

from media_files import (
    gray_frames,
    tone,
    write_audio,
    write_video,
    write_video_without_frames,
)
from trainer.data.media import (
    Bucket,
    MediaError,
    MediaInfo,
    auto_buckets,
    choose_bucket,
    decode_frames,
    log_mel,
    parse_bucket,
    probe,
    read_audio,
    read_caption,
    read_frames,
)

BARS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]  # red, green, blue, white, left to right


def _bars(width=128, height=64) -> np.ndarray:
    """[H, W, 3] four equal vertical bars; a centred crop to half the width keeps green then blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    for k, colour in enumerate(BARS):
        pixels[:, k * width // 4:(k + 1) * width // 4] = colour
    return pixels


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Every file the tests read, written once."""
    root = tmp_path_factory.mktemp("media")
    files = {
        "sound": write_video(root / "sound.mp4", gray_frames(range(0, 240, 10), 96, 64), fps=24,
                             audio=tone([(440, 0.5), (880, 1.0)], 1.0)),
        "silent": write_video(root / "silent.mp4", gray_frames(range(0, 240, 10)), fps=24),
        "ramp48": write_video(root / "ramp48.mp4", gray_frames(range(0, 240, 5)), fps=48),
        "bars": write_video(root / "bars.mp4", np.stack([_bars()] * 9), fps=24),
        "mono": write_audio(root / "mono.wav", tone(440, 0.5, channels=1)),
        "surround": write_audio(root / "surround.wav", tone(440, 0.5, channels=6)),
    }
    Image.fromarray(_bars()).save(root / "bars.png")
    Image.fromarray(np.full((48, 80, 3), 128, np.uint8)).save(root / "gray.jpg")
    files["bars.png"], files["gray.jpg"] = root / "bars.png", root / "gray.jpg"
    return files


def _brightness(frames: torch.Tensor) -> np.ndarray:
    """Mean pixel value (0..255) of each frame of a [3, F, H, W] tensor in [-1, 1]."""
    return ((frames.mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()


def _peak_hz(channel: torch.Tensor, rate: int = 16000) -> float:
    spectrum = torch.fft.rfft(channel).abs()
    return float(spectrum.argmax()) * rate / len(channel)


def _fails(call, path, *words):
    """`call` raises a MediaError whose message names `path` and contains every word of the reason."""
    with pytest.raises(MediaError) as caught:
        call()
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    for word in words:
        assert word in message, message
    return message


# Probing


def test_probe_video_with_and_without_audio(media):
    info = probe(media["sound"])
    assert (info.kind, info.width, info.height, info.num_frames, info.fps) == ("video", 96, 64, 24, 24.0)
    assert info.duration == pytest.approx(1.0) and info.has_audio and info.path == media["sound"]
    silent = probe(media["silent"])
    assert (silent.num_frames, silent.fps, silent.has_audio) == (24, 24.0, False)
    assert probe(media["ramp48"]).fps == 48.0


def test_probe_images(media):
    assert probe(media["bars.png"]) == MediaInfo(media["bars.png"], "image", 128, 64, 1, 0.0, 0.0, False)
    jpg = probe(media["gray.jpg"])
    assert (jpg.kind, jpg.width, jpg.height, jpg.num_frames) == ("image", 80, 48, 1)


# Frames


def test_read_frames_resamples_by_timestamp(media):
    """A 48 fps clip whose frame k has brightness 5k, read at 24 fps, gives every other frame."""
    info = probe(media["ramp48"])
    frames = read_frames(info, Bucket(64, 64, 9), target_fps=24)
    assert frames.shape == (3, 9, 64, 64) and frames.dtype == torch.float32
    np.testing.assert_allclose(_brightness(frames), [10 * i for i in range(9)], atol=3)
    later = read_frames(info, Bucket(64, 64, 9), target_fps=24, start=0.5)  # source frames 24, 26, ... 40
    np.testing.assert_allclose(_brightness(later), [5 * (24 + 2 * i) for i in range(9)], atol=3)


def test_read_frames_repeats_frames_when_upsampling(media):
    frames = read_frames(probe(media["sound"]), Bucket(64, 64, 9), target_fps=48)  # 24 fps source
    assert np.abs(np.diff(_brightness(frames))[::2]).max() < 2  # 0 and 1/48 s both pick source frame 0, ...


def test_a_phone_clip_with_display_rotation_is_probed_and_decoded_upright(tmp_path):
    """Phones store portrait clips as landscape frames plus a display rotation: probing gives the upright size and
    decoding turns the frames as a player does (90 degrees counterclockwise for a rotation of 90)."""
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:8, :16] = 255  # a block in the top-left corner of the stored frame
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt, stream.options = 64, 32, "yuv420p", {"crf": "0"}
        stream.set_display_rotation(90)
        for _ in range(9):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode())
    info = probe(path)
    assert (info.width, info.height) == (32, 64)
    frames = decode_frames(info, Bucket(32, 64, 9), target_fps=24)
    assert frames.shape == (9, 64, 32, 3)
    np.testing.assert_array_equal(frames[0].numpy(), np.rot90(stored, k=1))


@pytest.mark.parametrize("name, bucket", [("bars", Bucket(64, 64, 9)), ("bars.png", Bucket(32, 32, 1))])
def test_read_frames_crops_the_centre(media, name, bucket):
    """Four bars cropped to the middle half: green on the left, blue on the right; range [-1, 1]."""
    frames = read_frames(probe(media[name]), bucket, target_fps=24)
    assert frames.shape == (3, bucket.frames, bucket.height, bucket.width)
    assert frames.min() >= -1 and frames.max() <= 1
    quarter = bucket.width // 4
    left = frames[:, :, :, 2:quarter].mean(dim=(1, 2, 3))
    right = frames[:, :, :, -quarter:-2].mean(dim=(1, 2, 3))
    torch.testing.assert_close(left, torch.tensor([-1.0, 1.0, -1.0]), atol=0.1, rtol=0)
    torch.testing.assert_close(right, torch.tensor([-1.0, -1.0, 1.0]), atol=0.1, rtol=0)


def test_read_frames_refuses_a_span_past_the_end(media):
    _fails(lambda: read_frames(probe(media["silent"]), Bucket(64, 64, 25), target_fps=24), media["silent"],
           "too short")


# Audio


def test_read_audio_rate_length_and_offset(media):
    """The tone is 440 Hz for 0.5 s, then 880 Hz; each half comes back at 16 kHz on two channels."""
    first = read_audio(media["sound"], start=0.05, duration=0.4)
    second = read_audio(media["sound"], start=0.55, duration=0.4)
    assert first.shape == second.shape == (2, 6400) and first.dtype == torch.float32
    assert _peak_hz(first[0]) == pytest.approx(440, abs=5) and _peak_hz(first[1]) == pytest.approx(440, abs=5)
    assert _peak_hz(second[0]) == pytest.approx(880, abs=5)


def test_read_audio_switch_is_at_the_right_time(media):
    """The 440 -> 880 Hz switch at 0.5 s shows up 0.5 s into the read, within a few milliseconds."""
    audio = read_audio(media["sound"], start=0.0, duration=1.0)[0]
    crossings = np.flatnonzero(np.diff(np.signbit(audio.numpy()).astype(int)) != 0) / 16000
    periods = np.diff(crossings[::2])
    switch = crossings[::2][1:][np.argmax(periods < 1.5 / 1000)]  # first period shorter than 1.5 ms (880 Hz)
    assert switch == pytest.approx(0.5, abs=0.005)


def test_read_audio_duplicates_mono_and_downmixes_surround(media):
    mono = read_audio(media["mono"], start=0.0, duration=0.5)
    assert mono.shape == (2, 8000) and torch.equal(mono[0], mono[1])
    assert _peak_hz(mono[0]) == pytest.approx(440, abs=5) and mono.abs().max() > 0.3
    surround = read_audio(media["surround"], start=0.0, duration=0.5)
    assert surround.shape == (2, 8000) and _peak_hz(surround[1]) == pytest.approx(440, abs=5)


def test_read_audio_zero_pads_past_the_end(media):
    audio = read_audio(media["sound"], start=0.5, duration=1.0)  # the soundtrack ends at 1.0 s
    assert audio.shape == (2, 16000)
    assert audio[:, :7000].pow(2).mean().sqrt() > 0.2
    assert audio[:, 8800:].abs().max() == 0


# Log-mel


def test_log_mel_is_the_official_feature():
    waveform = torch.randn(2, 16000) * 0.1
    reference = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=1024, win_length=1024, hop_length=160, f_min=0, f_max=8000, n_mels=64,
        power=1.0, mel_scale="slaney", norm="slaney", center=True, pad_mode="reflect")(waveform)
    features = log_mel(waveform)
    assert features.shape == (2, 101, 64)  # [channels, time, mel bins]: 100 frames a second, plus one (centred)
    torch.testing.assert_close(features, reference.clamp(min=1e-5).log().transpose(1, 2))
    assert log_mel(torch.zeros(2, 1600)).min() == pytest.approx(math.log(1e-5))


# Refusals


def test_bad_video_files_are_refused_by_name_and_reason(media, tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    _fails(lambda: probe(empty), empty, "empty")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video, just words\n" * 20)
    _fails(lambda: probe(text), text, "not a media file")
    missing = tmp_path / "missing.mp4"
    _fails(lambda: probe(missing), missing, "missing")
    unknown = tmp_path / "clip.gif"
    unknown.write_bytes(b"GIF89a")
    _fails(lambda: probe(unknown), unknown, "unsupported file type '.gif'")
    _fails(lambda: read_audio(media["silent"], 0.0, 1.0), media["silent"], "has no audio stream")
    no_frames = write_video_without_frames(tmp_path / "no_frames.mkv")
    _fails(lambda: probe(no_frames), no_frames, "has no video frames")


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_video_is_refused(tmp_path, faststart):
    """Cut in half: without the index at the front the file does not open; with it, frames are missing."""
    rng = np.random.default_rng(0)
    whole = write_video(tmp_path / "whole.mp4", rng.integers(0, 255, (24, 64, 64, 3), dtype=np.uint8),
                        faststart=faststart)
    half = tmp_path / "half.mp4"
    half.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    _fails(lambda: probe(half), half, "truncated")


def test_variable_frame_rate_is_refused(tmp_path):
    path = write_video(tmp_path / "vfr.mp4", gray_frames(range(0, 90, 10)),
                       pts_ms=[0, 40, 80, 100, 120, 200, 210, 220, 300])
    _fails(lambda: probe(path), path, "variable frame rate", "10.0 to 80.0 ms")


@pytest.mark.skipif("libsvtav1" not in av.codecs_available, reason="PyAV has no AV1 encoder")
def test_codec_decord_cannot_decode_is_refused(tmp_path):
    """decord's bundled FFmpeg has no AV1 decoder, though PyAV reads the file."""
    path = write_video(tmp_path / "av1.mp4", gray_frames(range(0, 90, 10)), codec="libsvtav1")
    _fails(lambda: probe(path), path, "video codec 'av1' cannot be decoded")


def test_bad_images_are_refused(media, tmp_path):
    text = tmp_path / "photo.png"
    text.write_text("not an image")
    _fails(lambda: probe(text), text, "not an image")
    cut = tmp_path / "cut.png"
    cut.write_bytes(media["bars.png"].read_bytes()[:100])
    _fails(lambda: probe(cut), cut, "truncated or corrupt")


def test_too_short_and_extreme_aspect_are_refused(media, tmp_path):
    short = write_video(tmp_path / "short.mp4", gray_frames(range(5)), fps=24)
    _fails(lambda: choose_bucket(probe(short), auto_buckets(24), 24), short,
           "too short for any bucket (5 frames at 24 fps; shortest bucket needs 9 frames at 24 fps)")
    Image.fromarray(np.zeros((1024, 32, 3), np.uint8)).save(tmp_path / "tall.png")
    tall = tmp_path / "tall.png"
    _fails(lambda: choose_bucket(probe(tall), auto_buckets(24), 24), tall, "aspect ratio 0.0312", "is extreme",
           "differs by more than 2x")


def test_captions(tmp_path):
    clip = tmp_path / "clip.mp4"
    _fails(lambda: read_caption(clip), clip, "clip.txt is missing")
    (tmp_path / "clip.txt").write_bytes(b"caf\xe9 latte")
    _fails(lambda: read_caption(clip), clip, "clip.txt is not UTF-8")
    (tmp_path / "clip.txt").write_text("  \n ")
    _fails(lambda: read_caption(clip), clip, "clip.txt is empty")
    (tmp_path / "clip.txt").write_text("\ufeff  a cat on a mat \n", encoding="utf-8")
    assert read_caption(clip) == "a cat on a mat"


def test_media_error_survives_pickling():
    """Worker processes send errors back pickled."""
    error = pickle.loads(pickle.dumps(MediaError("/data/a.mp4: has no audio stream")))
    assert isinstance(error, ValueError) and str(error) == "/data/a.mp4: has no audio stream"


# Buckets


def _video(width, height, num_frames=121, fps=24.0):
    return MediaInfo(Path("clip.mp4"), "video", width, height, num_frames, fps, num_frames / fps, has_audio=True)


def test_choose_bucket_nearest_aspect_longest_clip():
    buckets = [parse_bucket(b) for b in ("768x512x121", "512x768x121", "832x448x121", "832x448x49",
                                         "512x512x1", "512x512x121")]
    assert str(choose_bucket(_video(1920, 1080), buckets, 24)) == "832x448x121"
    assert str(choose_bucket(_video(1080, 1920), buckets, 24)) == "512x768x121"
    assert str(choose_bucket(_video(1920, 1080, num_frames=100), buckets, 24)) == "832x448x49"
    assert str(choose_bucket(_video(640, 600), buckets, 24)) == "512x512x121"
    image = MediaInfo(Path("photo.png"), "image", 4000, 3000, 1, 0.0, 0.0, False)
    assert str(choose_bucket(image, buckets, 24)) == "512x512x1"


def test_choose_bucket_length_uses_target_fps():
    """F frames at target_fps fit when the last one is not after the clip's last frame."""
    buckets = [Bucket(64, 64, 9), Bucket(64, 64, 17)]
    assert choose_bucket(_video(64, 64, 9, 24), buckets, 24).frames == 9
    assert choose_bucket(_video(64, 64, 17, 48), buckets, 24).frames == 9
    assert choose_bucket(_video(64, 64, 33, 48), buckets, 24).frames == 17
    with pytest.raises(MediaError, match="too short"):
        choose_bucket(_video(64, 64, 16, 48), buckets, 24)


def test_choose_bucket_keeps_images_and_videos_apart():
    with pytest.raises(MediaError, match="no image bucket"):
        choose_bucket(MediaInfo(Path("photo.png"), "image", 64, 64, 1, 0.0, 0.0, False), [Bucket(64, 64, 9)], 24)
    with pytest.raises(MediaError, match="no video bucket"):
        choose_bucket(_video(64, 64), [Bucket(64, 64, 1)], 24)


def test_auto_buckets_are_valid_and_deterministic():
    buckets = auto_buckets(24)
    assert buckets == auto_buckets(24)
    assert all(b.width % 32 == 0 and b.height % 32 == 0 and b.width * b.height <= 768 * 512 for b in buckets)
    assert sorted({b.frames for b in buckets}) == [1, 9, 17, 25, 33, 49, 65, 97, 121]
    sizes = {(b.width, b.height) for b in buckets}
    assert len(sizes) == 7 and {(768, 512), (512, 768), (800, 448), (448, 800), (608, 608)} <= sizes
    assert all((h, w) in sizes for w, h in sizes)
    assert all(b.width * b.height > 0.85 * 768 * 512 for b in buckets)
    assert max(b.frames for b in auto_buckets(24, max_frames=100)) == 97
    small = auto_buckets(24, max_pixels=64 * 64, max_frames=9)
    assert all(b.width * b.height <= 64 * 64 and b.frames in (1, 9) for b in small)


def test_parse_bucket():
    bucket = parse_bucket("768x512x121")
    assert bucket == Bucket(768, 512, 121) and str(bucket) == "768x512x121"
    assert parse_bucket("512x512x1").frames == 1
    for text in ("770x512x121", "768x512x120", "768x512x5", "768x512", "0x0x1", "big"):
        with pytest.raises(ValueError, match=text):
            parse_bucket(text)
    with pytest.raises(ValueError, match="multiples of 32"):
        Bucket(100, 64, 9)
