"""The demo dataset: real mp4 clips (H.264 + AAC) and PNG images with captions, whose picture, sound and caption
tell the same story; written once, atomically, and reproducibly from the seed."""

from __future__ import annotations

import json

import av
import decord
import numpy as np
import pytest
from PIL import Image

from trainer.data import demo
from trainer.data.demo import MARKER, SAMPLE_RATE, write_demo_dataset
from trainer.models.tiny import tiny_tokenizer

WIDTH, HEIGHT, FRAMES, FPS = 192, 128, 25, 24.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, write_demo_dataset(root, seed=0)


def _listing(root) -> dict:
    return json.loads((root / MARKER).read_text())


def _frames(path) -> np.ndarray:
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def _sound(path) -> tuple[np.ndarray, av.audio.stream.AudioStream]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        pcm = np.concatenate([frame.to_ndarray() for frame in container.decode(stream)], axis=1)
        return pcm, stream


def _dominant_hz(mono: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    return float(np.fft.rfftfreq(len(mono), 1 / SAMPLE_RATE)[spectrum.argmax()])


def _square_x(frame: np.ndarray) -> float:
    """Mean column of the pixels that differ from the background (the top left pixel)."""
    moved = np.abs(frame.astype(int) - frame[0, 0].astype(int)).sum(-1) > 60
    return float(np.nonzero(moved)[1].mean())


def test_files_exist_with_captions_and_stay_small(dataset):
    root, media = dataset
    listing = _listing(root)
    assert [p.name for p in media] == [f"clip_{i:03d}.mp4" for i in range(6)] + ["image_000.png", "image_001.png"]
    for path, entry in zip(media, listing["clips"] + listing["images"]):
        assert path.is_file() and path.name == entry["file"]
        assert path.with_suffix(".txt").read_text(encoding="utf-8").strip() == entry["caption"]
    assert sorted(p.name for p in (root / "references").iterdir()) == sorted(p.name for p in media)
    files = [p for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 1_000_000
    assert not [p for p in files if p.name.startswith(".")]  # no temporary files left


def test_each_reference_is_its_samples_shape_in_white_on_black_and_silent(dataset):
    root, media = dataset
    for path in media:
        reference = root / "references" / path.name
        if path.suffix == ".png":
            sample, control = np.asarray(Image.open(path)), np.asarray(Image.open(reference))[None]
            sample = sample[None]
        else:
            sample, control = _frames(path), _frames(reference)
            with av.open(str(reference)) as container:
                assert not container.streams.audio
        assert control.shape == sample.shape
        assert np.minimum(control, 255 - control).max() < 40  # black or white, nothing between
        shape = control.mean(-1) > 127
        assert shape.any(axis=(1, 2)).all()  # the shape is in every frame
        moved = np.abs(sample.astype(int) - sample[:, :1, :1].astype(int)).sum(-1) > 60
        assert (shape == moved).mean() > 0.99  # where the sample's shape is


def test_clips_decode_with_the_frame_count_rate_and_motion_the_caption_says(dataset):
    root, _ = dataset
    for clip in _listing(root)["clips"]:
        reader = decord.VideoReader(str(root / clip["file"]))
        assert len(reader) == FRAMES and reader.get_avg_fps() == pytest.approx(FPS)
        frames = _frames(root / clip["file"])
        assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
        assert clip["colour"] in clip["caption"] and clip["direction"] in clip["caption"]
        if not clip["bounces"]:
            first, last = _square_x(frames[0]), _square_x(frames[-1])
            assert (last > first + 20) if clip["direction"] == "right" else (last < first - 20)


def test_the_tone_rises_as_the_square_moves_right_and_a_bounce_is_a_beat(dataset):
    root, _ = dataset
    quarter = SAMPLE_RATE // 4
    directions = set()
    for clip in _listing(root)["clips"]:
        pcm, stream = _sound(root / clip["file"])
        assert stream.codec_context.name == "aac" and stream.rate == SAMPLE_RATE and pcm.shape[0] == 2
        assert pcm.shape[1] >= round(FRAMES / FPS * SAMPLE_RATE)
        mono = pcm[:, : round(FRAMES / FPS * SAMPLE_RATE)].mean(0)
        if clip["bounces"]:
            at = round(clip["bounces"][0] * SAMPLE_RATE)
            before, after = mono[at - 2400 : at - 400], mono[at : at + 2000]
            assert np.sqrt(np.mean(after**2)) > 1.5 * np.sqrt(np.mean(before**2))
            continue
        start, end = _dominant_hz(mono[:quarter]), _dominant_hz(mono[-quarter:])
        assert (end > 1.3 * start) if clip["direction"] == "right" else (start > 1.3 * end)
        assert "rising" in clip["caption"] if clip["direction"] == "right" else "falling" in clip["caption"]
        directions.add(clip["direction"])
    assert directions == {"left", "right"}


def test_images_open_with_pillow(dataset):
    root, media = dataset
    for path in media[6:]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (WIDTH, HEIGHT)


def test_a_complete_dataset_is_not_rewritten(dataset):
    root, media = dataset
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert write_demo_dataset(root, seed=0) == media
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_an_interrupted_run_leaves_no_half_file_and_the_next_run_completes(tmp_path, monkeypatch):
    soundtrack = demo._soundtrack
    calls = []

    def dies_on_the_second_clip(clip, duration):
        calls.append(clip)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return soundtrack(clip, duration)

    monkeypatch.setattr(demo, "_soundtrack", dies_on_the_second_clip)
    with pytest.raises(KeyboardInterrupt):
        write_demo_dataset(tmp_path, num_clips=2, num_images=0, width=64, height=32, frames=9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip_000.mp4", "clip_000.txt", "references"]
    assert [p.name for p in (tmp_path / "references").iterdir()] == ["clip_000.mp4"]
    monkeypatch.setattr(demo, "_soundtrack", soundtrack)
    media = write_demo_dataset(tmp_path, num_clips=2, num_images=0, width=64, height=32, frames=9)
    assert [p.name for p in media] == ["clip_000.mp4", "clip_001.mp4"] and (tmp_path / MARKER).is_file()


def test_same_seed_same_content(dataset, tmp_path):
    root, media = dataset
    again = write_demo_dataset(tmp_path, seed=0)
    for first, second in zip(media, again):
        assert first.with_suffix(".txt").read_text() == second.with_suffix(".txt").read_text()
    for first, second in zip(media[:6], again[:6]):
        assert np.array_equal(_frames(first), _frames(second))
        np.testing.assert_allclose(_sound(first)[0], _sound(second)[0], atol=1e-3)
    for first, second in zip(media[6:], again[6:]):
        assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    other = write_demo_dataset(tmp_path / "other", num_clips=6, num_images=2, seed=1)
    assert [p.with_suffix(".txt").read_text() for p in other] != [p.with_suffix(".txt").read_text() for p in media]


def test_every_caption_is_in_the_tiny_tokenizers_vocabulary(tmp_path):
    """Longer clips bounce several times: all three caption forms appear."""
    media = write_demo_dataset(tmp_path, num_clips=4, num_images=2, width=64, height=32, frames=49)
    tokenizer = tiny_tokenizer()
    captions = [p.with_suffix(".txt").read_text() for p in media]
    assert any("back and forth" in c for c in captions) and any("comes back" in c for c in captions)
    for caption in captions:
        assert tokenizer.unk_token_id not in tokenizer(caption).input_ids, caption
