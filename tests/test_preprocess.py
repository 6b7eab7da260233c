"""Preprocessing: demo media through tiny VAEs and text path into the cache; re-runs, changes, bad files, crashes."""

import json
import shutil

import numpy as np
import pytest
import torch
from media_files import gray_frames, tone, write_video

import trainer.data.preprocess as preprocess_module
from trainer.config import resolve
from trainer.data.cache import CacheError, LatentCache
from trainer.data.demo import write_demo_dataset
from trainer.data.preprocess import REPORT, preprocess
from trainer.models.registry import TARGETS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    write_demo_dataset(root, num_clips=3, num_images=1)
    return root


def _config(tmp_path, source, **data):
    return resolve({
        "output_dir": str(tmp_path / "run"),
        "model": {"target": "tiny-ltx-2.3"},
        "trigger_word": "zq",
        "data": {"cache_dir": str(tmp_path / "cache"), "source": str(source),
                 "buckets": ["192x128x25", "192x128x1"], **data},
    })


def _mtimes(cache):
    return {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}


def test_demo_media_become_a_valid_cache_and_reruns_reuse_it(tmp_path, demo):
    cfg = _config(tmp_path, demo)
    report = preprocess(cfg, progress=False)
    assert (report.samples, report.encoded, report.reused, report.skipped) == (4, 4, 0, [])
    assert report.per_bucket == {"192x128x25": 3, "192x128x1": 1}

    target = TARGETS["tiny-ltx-2.3"]
    cache = LatentCache(cfg.data.cache_dir, target.version, target.video_text_dim, target.audio_text_dim,
                        require_audio=False)
    samples = {cache[i]["name"]: cache[i] for i in range(len(cache))}
    clip = samples["clip_000"]
    assert clip["video_latents"].shape == (128, 4, 4, 6)  # 25 frames -> 4 latent frames; 128x192 / 32
    assert clip["audio_latents"].shape[0] == 8 and clip["audio_latents"].shape[2] == 16
    assert clip["fps"] == 24.0
    assert samples["image_000"]["video_latents"].shape == (128, 1, 4, 6) and "audio_latents" not in samples["image_000"]
    assert not torch.equal(clip["video_latents"], samples["clip_001"]["video_latents"])
    saved = json.loads((tmp_path / "cache" / REPORT).read_text())
    assert saved["samples"] == 4 and saved["per_bucket"] == report.per_bucket

    before = _mtimes(tmp_path / "cache")
    again = preprocess(cfg, progress=False)
    assert (again.encoded, again.reused) == (0, 4)
    assert _mtimes(tmp_path / "cache") == before


def test_changed_settings_re_encode_exactly_the_affected_samples(tmp_path, demo):
    preprocess(_config(tmp_path, demo), progress=False)
    # Buckets change only for the clips (images keep their bucket).
    report = preprocess(_config(tmp_path, demo, buckets=["192x128x17", "192x128x1"]), progress=False)
    assert (report.encoded, report.reused) == (3, 1)
    # A new trigger word changes every caption.
    cfg = _config(tmp_path, demo, buckets=["192x128x17", "192x128x1"])
    cfg.trigger_word = "newword"
    assert preprocess(cfg, progress=False).encoded == 4


def test_bad_files_are_reported_and_skipped(tmp_path, demo):
    source = tmp_path / "mixed"
    shutil.copytree(demo, source)
    (source / "empty.mp4").write_bytes(b"")
    (source / "empty.txt").write_text("nothing")
    (source / "notes.mp4").write_text("this is not a video")
    (source / "notes.txt").write_text("text")
    good = (source / "clip_000.mp4").read_bytes()
    (source / "cut.mp4").write_bytes(good[: len(good) // 3])
    (source / "cut.txt").write_text("a cut clip")
    shutil.copy(source / "clip_001.mp4", source / "uncaptioned.mp4")
    write_video(source / "short.mp4", gray_frames(range(0, 90, 10)), fps=24)  # 9 frames: shorter than 25
    (source / "short.txt").write_text("too short")
    shutil.copy(source / "image_000.png", source / "clip_002.png")  # clip_002 now names two media

    report = preprocess(_config(tmp_path, source), progress=False)
    reasons = {r["file"].split("/")[-1]: r["reason"] for r in report.skipped}
    assert set(reasons) == {"empty.mp4", "notes.mp4", "cut.mp4", "uncaptioned.mp4", "short.mp4", "clip_002.mp4",
                            "clip_002.png"}
    assert "caption" in reasons["uncaptioned.mp4"] and "missing" in reasons["uncaptioned.mp4"]
    assert "too short" in reasons["short.mp4"]
    assert "also named 'clip_002'" in reasons["clip_002.png"]
    assert report.samples == 3  # clip_000, clip_001 and image_000
    saved = json.loads((tmp_path / "cache" / REPORT).read_text())
    assert len(saved["skipped"]) == 7


def test_nothing_usable_is_an_error(tmp_path):
    source = tmp_path / "bad"
    source.mkdir()
    (source / "a.mp4").write_text("not a video")
    (source / "a.txt").write_text("caption")
    with pytest.raises(CacheError, match=r"no usable samples in .*bad: 1 skipped"):
        preprocess(_config(tmp_path, source), progress=False)


def test_audio_modes_skip_clips_without_sound(tmp_path):
    source = tmp_path / "clips"
    source.mkdir()
    frames = gray_frames(np.linspace(0, 250, 25).astype(int), width=192, height=128)
    write_video(source / "silent.mp4", frames)
    (source / "silent.txt").write_text("a silent clip")
    write_video(source / "loud.mp4", frames, audio=tone(440, 25 / 24))
    (source / "loud.txt").write_text("a loud clip")
    cfg = _config(tmp_path, source)
    cfg.mode = "text-to-audio-video"
    report = preprocess(cfg, progress=False)
    assert report.samples == 1
    assert [r["file"].split("/")[-1] for r in report.skipped] == ["silent.mp4"]
    assert "no audio" in report.skipped[0]["reason"]


def test_an_interrupted_run_is_completed_by_the_next(tmp_path, demo, monkeypatch):
    cfg = _config(tmp_path, demo)
    real = preprocess_module.write_sample
    calls = {"n": 0}

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(preprocess_module, "write_sample", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        preprocess(cfg, progress=False)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary files left behind
    monkeypatch.undo()

    report = preprocess(cfg, progress=False)
    assert (report.encoded, report.reused, report.samples) == (2, 2, 4)
    target = TARGETS["tiny-ltx-2.3"]
    assert len(LatentCache(cfg.data.cache_dir, target.version, target.video_text_dim, target.audio_text_dim,
                           require_audio=False)) == 4
