"""Preprocessing: demo media through tiny VAEs and text path into the cache; re-runs, changes, bad files, crashes;
IC-LoRA references, loss masks and the cached empty prompt."""

import json
import shutil

import numpy as np
import pytest
import torch
from accelerate import PartialState
from media_files import gray_frames, tone, write_video
from PIL import Image
from safetensors import safe_open

import trainer.data.preprocess as preprocess_module
from trainer.config import ConfigError, resolve
from trainer.data import media
from trainer.data.cache import EMPTY_PROMPT, CacheError, LatentCache
from trainer.data.demo import write_demo_dataset
from trainer.data.preprocess import REPORT, preprocess
from trainer.models.components import encode_video, load_components
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
    # 25 frames at 24 fps: round(25 / 24 * 25) = 26 steps, the length the official pipelines generate (the audio
    # VAE itself gives 27: the centred mel frames overhang both edges).
    assert clip["audio_latents"].shape == (8, 26, 16)
    assert clip["fps"] == 24.0
    assert samples["image_000"]["video_latents"].shape == (128, 1, 4, 6) and "audio_latents" not in samples["image_000"]
    assert not torch.equal(clip["video_latents"], samples["clip_001"]["video_latents"])
    # The demo's references/ folder gives every sample its reference, at the sample's size (factors 1).
    assert all(s["reference_latents"].shape == s["video_latents"].shape for s in samples.values())
    saved = json.loads((tmp_path / "cache" / REPORT).read_text())
    assert saved["samples"] == 4 and saved["per_bucket"] == report.per_bucket

    before = _mtimes(tmp_path / "cache")
    again = preprocess(cfg, progress=False)
    assert (again.encoded, again.reused) == (0, 4)
    assert _mtimes(tmp_path / "cache") == before


def test_every_process_passes_the_same_barriers_whether_the_demo_is_there_or_not(tmp_path, demo, monkeypatch):
    """A process that finds the demo folder already begun by the main one must still meet it at its barriers."""
    import trainer.data.preprocess as preprocess_module

    class Stop(Exception):
        pass

    barriers = []

    class SecondProcess:  # of two; it never writes the demo
        is_main_process, process_index, num_processes = False, 1, 2

        def wait_for_everyone(self):
            barriers.append(1)

    def stop(*args):
        raise Stop

    monkeypatch.setattr(preprocess_module, "PartialState", SecondProcess)
    monkeypatch.setattr(preprocess_module, "plan", stop)  # where the processes' paths could start to differ
    counts = []
    for source in (tmp_path / "not-yet-written", demo):
        barriers.clear()
        with pytest.raises(Stop):
            preprocess(_config(tmp_path, source, demo=True), progress=False)
        counts.append(len(barriers))
    assert counts[0] == counts[1]


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


# --- IC-LoRA references, loss masks, the empty prompt --------------------------------------------------------------

SMALL = ["128x64x17"]  # 4 x 2 latent columns x rows, 3 latent frames
STEPS = np.arange(17) * 15  # brightness of frame k: every frame differs, so frame selection shows in the latents


def _clip(path, values=STEPS, width=128, height=64):
    return write_video(path, gray_frames(values, width=width, height=height))


def _mask_image(path, white_columns=None, width=256, height=128):
    """A grayscale PNG, white in the columns `white_columns` (a slice), black elsewhere."""
    pixels = np.zeros((height, width), np.uint8)
    if white_columns is not None:
        pixels[:, white_columns] = 255
    Image.fromarray(pixels, "L").save(path)
    return path


def _manifest(path, rows):
    path.write_text("".join(json.dumps({"caption": f"sample {r['media']}", **r}) + "\n" for r in rows))
    return path


def _open(cache_dir):
    target = TARGETS["tiny-ltx-2.3"]
    return LatentCache(cache_dir, target.version, target.video_text_dim, target.audio_text_dim, require_audio=False)


def _samples(cache_dir):
    cache = _open(cache_dir)
    return {cache[i]["name"]: cache[i] for i in range(len(cache))}


def _reasons(report):
    return {r["file"].split("/")[-1]: r["reason"] for r in report.skipped}


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
    """One run over samples with a reference (reference_downscale 2, reference_temporal_scale 2), masks of each
    kind, and broken references and masks."""
    root = tmp_path_factory.mktemp("conditioned")
    _clip(root / "plain.mp4")
    _clip(root / "referenced.mp4")
    _clip(root / "depth.mp4", values=255 - STEPS, width=256, height=128)  # any size: resized like the sample
    _clip(root / "left.mp4")
    _mask_image(root / "left_half.png", white_columns=slice(0, 128))
    _clip(root / "timed.mp4")
    # Frame 0 white; frames 1-3 of 1-8 (3/8, under half); frames 9-12 of 9-16 (4/8, half) in the top half only.
    timed = np.zeros((17, 64, 128, 3), np.uint8)
    timed[0], timed[1:4], timed[9:13, :32] = 255, 255, 255
    write_video(root / "timed_mask.mp4", timed)
    _clip(root / "unmasked.mp4")
    _mask_image(root / "black.png")
    _clip(root / "lost.mp4")
    _clip(root / "garbled.mp4")
    (root / "garbled.png").write_text("not an image")
    rows = [
        {"media": "plain.mp4"},
        {"media": "referenced.mp4", "reference": "depth.mp4"},
        {"media": "left.mp4", "mask": "left_half.png"},
        {"media": "timed.mp4", "mask": "timed_mask.mp4"},
        {"media": "unmasked.mp4", "mask": "black.png"},
        {"media": "lost.mp4", "reference": "nowhere.mp4"},
        {"media": "garbled.mp4", "mask": "garbled.png"},
    ]
    cfg = _config(root, _manifest(root / "data.jsonl", rows), buckets=SMALL, reference_downscale=2,
                  reference_temporal_scale=2)
    return cfg, preprocess(cfg, progress=False), root / "cache"


def test_reference_latents_have_the_downscaled_size_and_every_kth_frame(conditioned):
    cfg, report, cache_dir = conditioned
    samples = _samples(cache_dir)
    reference = samples["referenced"]["reference_latents"]
    assert samples["referenced"]["video_latents"].shape == (128, 3, 2, 4)
    assert reference.shape == (128, 2, 1, 2)  # 64x32 pixels, (17 - 1) / 2 + 1 = 9 frames
    assert "reference_latents" not in samples["plain"]

    # Exactly the sample's 17 frames (same span and sampling) at the reference size, then every second one.
    device = PartialState().device  # where preprocessing encoded (GPU convolutions round differently from the CPU)
    vae = load_components(cfg, device).video_vae
    frames = media.read_frames(media.probe(cache_dir.parent / "depth.mp4"), media.Bucket(64, 32, 17), cfg.data.fps)
    tolerance = {} if device.type == "cpu" else {"rtol": 1e-3, "atol": 1e-3}
    torch.testing.assert_close(reference, encode_video(vae, frames[:, ::2].contiguous()), **tolerance)
    assert not torch.allclose(reference, encode_video(vae, frames[:, :9].contiguous()))


def test_reference_factors_are_recorded_with_the_sample(conditioned):
    _, _, cache_dir = conditioned
    with safe_open(str(cache_dir / "referenced.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    assert (metadata["reference_downscale"], metadata["reference_temporal_scale"]) == ("2", "2")
    entries = {e["file"]: e for e in json.loads((cache_dir / "manifest.json").read_text())["samples"]}
    assert entries["referenced.safetensors"]["reference_shape"] == [128, 2, 1, 2]
    assert entries["referenced.safetensors"]["reference_downscale"] == 2
    assert entries["plain.safetensors"]["reference_shape"] is None
    cache = _open(cache_dir)
    keys = {cache[i]["name"]: cache.shape_key(i) for i in range(len(cache))}
    assert keys["referenced"] != keys["plain"]  # a reference never batches with a sample without one


def test_image_mask_with_left_half_white_selects_the_left_latent_columns(conditioned):
    mask = _samples(conditioned[2])["left"]["video_loss_mask"]
    assert mask.shape == (3, 2, 4)  # the latent grid, the picture repeated for every frame
    assert torch.equal(mask[:, :, :2], torch.ones(3, 2, 2)) and torch.equal(mask[:, :, 2:], torch.zeros(3, 2, 2))


def test_video_mask_is_thresholded_per_latent_cell_and_frame_group(conditioned):
    mask = _samples(conditioned[2])["timed"]["video_loss_mask"]
    expected = torch.zeros(3, 2, 4)
    expected[0] = 1  # latent frame 0 is pixel frame 0 alone
    expected[2, 0] = 1  # frames 9-16: half white in the top row; frames 1-8: under half white
    assert torch.equal(mask, expected)
    assert "video_loss_mask" not in _samples(conditioned[2])["plain"]


def test_bad_references_and_masks_skip_their_sample_with_the_reason(conditioned):
    _, report, cache_dir = conditioned
    reasons = _reasons(report)
    assert set(reasons) == {"unmasked.mp4", "lost.mp4", "garbled.mp4"}
    assert "black.png" in reasons["unmasked.mp4"] and "mask selects nothing" in reasons["unmasked.mp4"]
    assert reasons["lost.mp4"].startswith("reference ") and "nowhere.mp4: file is missing" in reasons["lost.mp4"]
    assert reasons["garbled.mp4"].startswith("mask ") and "garbled.png: is not an image" in reasons["garbled.mp4"]
    assert set(_samples(cache_dir)) == {"plain", "referenced", "left", "timed"}


def test_reference_factors_the_vae_cannot_take_skip_the_sample(tmp_path):
    _clip(tmp_path / "a.mp4")
    _clip(tmp_path / "a_depth.mp4")
    _clip(tmp_path / "b.mp4")
    source = _manifest(tmp_path / "data.jsonl", [{"media": "a.mp4", "reference": "a_depth.mp4"},
                                                     {"media": "b.mp4"}])
    report = preprocess(_config(tmp_path, source, buckets=SMALL, reference_downscale=4), progress=False)
    assert report.samples == 1
    assert "reference_downscale=4 gives 32x16" in _reasons(report)["a.mp4"]
    assert "multiples of 32" in _reasons(report)["a.mp4"]
    report = preprocess(_config(tmp_path, source, buckets=SMALL, reference_temporal_scale=3), progress=False)
    assert (report.samples, report.reused) == (1, 1)
    assert "reference_temporal_scale=3 gives 6.33333 frames, but frames must be 8j+1" in _reasons(report)["a.mp4"]


def test_changing_a_reference_file_or_factor_re_encodes_only_that_sample(tmp_path):
    _clip(tmp_path / "a.mp4")
    _clip(tmp_path / "a_depth.mp4")
    _clip(tmp_path / "b.mp4")
    source = _manifest(tmp_path / "data.jsonl", [{"media": "a.mp4", "reference": "a_depth.mp4"}, {"media": "b.mp4"}])
    cache_dir = tmp_path / "cache"
    assert preprocess(_config(tmp_path, source, buckets=SMALL), progress=False).encoded == 2
    first = _mtimes(cache_dir)
    old_reference = _samples(cache_dir)["a"]["reference_latents"]

    _clip(tmp_path / "a_depth.mp4", values=STEPS[::-1])
    report = preprocess(_config(tmp_path, source, buckets=SMALL), progress=False)
    assert (report.encoded, report.reused) == (1, 1)
    second = _mtimes(cache_dir)
    assert second["b.safetensors"] == first["b.safetensors"] and second["a.safetensors"] != first["a.safetensors"]
    assert not torch.equal(_samples(cache_dir)["a"]["reference_latents"], old_reference)

    report = preprocess(_config(tmp_path, source, buckets=SMALL, reference_downscale=2), progress=False)
    assert (report.encoded, report.reused) == (1, 1)
    assert _mtimes(cache_dir)["b.safetensors"] == first["b.safetensors"]
    assert _samples(cache_dir)["a"]["reference_latents"].shape == (128, 3, 1, 2)


def test_empty_prompt_is_cached_once_and_reused(conditioned, tmp_path):
    cfg, _, cache_dir = conditioned
    path = cache_dir / EMPTY_PROMPT
    written = path.stat().st_mtime_ns
    assert "empty_prompt" not in (cache_dir / "manifest.json").read_text()
    again = preprocess(cfg, progress=False)
    assert again.encoded == 0 and path.stat().st_mtime_ns == written

    target = TARGETS["tiny-ltx-2.3"]
    empty = _open(cache_dir).empty_prompt()
    assert empty["video_text_embeds"].shape[1] == target.video_text_dim
    assert empty["audio_text_embeds"].shape[1] == target.audio_text_dim
    assert empty["text_mask"].shape == empty["video_text_embeds"].shape[:1] and empty["text_mask"].dtype == torch.int64
    caption_len = _samples(cache_dir)["plain"]["text_mask"].shape  # the same padded length as every caption
    assert empty["text_mask"].shape == caption_len
    assert not torch.equal(empty["video_text_embeds"], _samples(cache_dir)["plain"]["video_text_embeds"])

    copy = tmp_path / "copy"
    shutil.copytree(cache_dir, copy)
    (copy / EMPTY_PROMPT).unlink()
    with pytest.raises(CacheError, match=r"copy/extras/empty_prompt.safetensors is missing"):
        _open(copy).empty_prompt()


def test_training_from_media_with_caption_dropout(tmp_path, demo):
    from trainer.train import train

    cfg = _config(tmp_path, demo)
    cfg.train.steps, cfg.train.caption_dropout_p, cfg.train.gradient_checkpointing = 2, 0.5, False
    result = train(cfg, progress=False)  # preprocesses data.source first, then trains on the cache
    assert result.final_step == 2 and len(result.exported) == 2
    assert json.loads((tmp_path / "cache" / REPORT).read_text())["samples"] == 4


def test_a_folder_dataset_takes_references_and_masks_from_same_stem_files_beside_it(tmp_path):
    source = tmp_path / "data"
    (source / "references").mkdir(parents=True)
    (source / "masks").mkdir()
    for name in ("a", "b"):
        _clip(source / f"{name}.mp4")
        (source / f"{name}.txt").write_text(f"sample {name}")
    _clip(source / "references" / "a.mp4", values=255 - STEPS)
    _mask_image(source / "masks" / "b.png", white_columns=slice(0, 64), width=128, height=64)
    preprocess(_config(tmp_path, source, buckets=SMALL), progress=False)
    samples = _samples(tmp_path / "cache")
    assert samples["a"]["reference_latents"].shape == (128, 3, 2, 4) and "video_loss_mask" not in samples["a"]
    assert "reference_latents" not in samples["b"] and samples["b"]["video_loss_mask"][:, :, :2].all()
    _clip(source / "references" / "a.mkv")
    with pytest.raises(ConfigError, match=r"references holds 2 files for sample 'a' \(a.mkv, a.mp4\); keep one"):
        preprocess(_config(tmp_path, source, buckets=SMALL), progress=False)


def test_ic_lora_skips_samples_without_a_reference_and_references_of_another_shape(tmp_path):
    for name in ("paired", "alone", "wide"):
        _clip(tmp_path / f"{name}.mp4")
    _clip(tmp_path / "paired_depth.mp4", width=256, height=128)  # same aspect ratio, any size
    _clip(tmp_path / "wide_depth.mp4", width=256, height=64)
    source = _manifest(tmp_path / "data.jsonl", [{"media": "paired.mp4", "reference": "paired_depth.mp4"},
                                                   {"media": "alone.mp4"},
                                                   {"media": "wide.mp4", "reference": "wide_depth.mp4"}])
    cfg = _config(tmp_path, source, buckets=SMALL)
    cfg.mode = "ic-lora"
    report = preprocess(cfg, progress=False)
    reasons = _reasons(report)
    assert report.samples == 1 and set(reasons) == {"alone.mp4", "wide.mp4"}
    assert reasons["alone.mp4"] == "has no reference video, and mode ic-lora trains on pairs"
    assert "wide_depth.mp4: is 256x64, another aspect ratio than the sample's 128x64" in reasons["wide.mp4"]
