"""The latent cache format: exact round trip, manifest, atomic writes, and every refusal with a clear message."""

import json

import pytest
import torch

from trainer.data import cache
from trainer.data.cache import CacheError, LatentCache, write_manifest, write_sample

DV, DA = 32, 16  # text widths of the opened target


def _tensors(frames=2, text_len=5, audio_steps=7, video_dim=DV, audio_dim=DA):
    tensors = {
        "video_latents": torch.randn(128, frames, 3, 4),
        "video_text_embeds": torch.randn(text_len, video_dim),
        "audio_text_embeds": torch.randn(text_len, audio_dim),
        "text_mask": torch.tensor([1] * (text_len - 1) + [0]),
    }
    if audio_steps is not None:
        tensors["audio_latents"] = torch.randn(8, audio_steps, 16)
    return tensors


def _metadata(**overrides):
    return {"model_version": "2.3", "fps": 24.0, "caption": "a cat", "num_frames": 9, "height": 96, "width": 128,
            **overrides}


def _open(cache_dir, model_version="2.3", require_audio=True, video_dim=DV, audio_dim=DA):
    return LatentCache(cache_dir, model_version, video_dim, audio_dim, require_audio)


def _cache_with(tmp_path, tensors=None, metadata=None, model_version="2.3"):
    write_sample(tmp_path, "clip", tensors or _tensors(), metadata or _metadata())
    write_manifest(tmp_path, model_version)
    return tmp_path


def test_round_trip_is_exact(tmp_path):
    a = _tensors()
    a["video_loss_mask"] = (torch.rand(2, 3, 4) > 0.5).float()
    b = _tensors(frames=3, audio_steps=None)
    b["video_latents"] = b["video_latents"].bfloat16()  # stored compactly, read as float32
    write_sample(tmp_path, "a", a, _metadata())
    write_sample(tmp_path, "b", b, _metadata(fps=25, caption="b"))
    write_manifest(tmp_path, "2.3")
    dataset = _open(tmp_path, require_audio=False)
    assert len(dataset) == 2

    first, second = dataset[0], dataset[1]
    assert first["name"] == "a" and first["fps"] == 24.0 and second["fps"] == 25.0
    assert set(first) == set(a) | {"name", "fps"} and set(second) == set(b) | {"name", "fps"}
    for key, value in a.items():
        assert torch.equal(first[key], value)
    assert first["text_mask"].dtype == torch.int64 and first["video_latents"].dtype == torch.float32
    assert second["video_latents"].dtype == torch.float32
    assert torch.equal(second["video_latents"], b["video_latents"].float())

    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"ltx_lora_cache_version": "1", "model_version": "2.3", "fps": "24.0",
                                "caption": "a cat", "num_frames": "9", "height": "96", "width": "128"}


def test_manifest_content_and_shape_keys(tmp_path):
    write_sample(tmp_path, "b", _tensors(audio_steps=None), _metadata(caption="second"))
    write_sample(tmp_path, "a", _tensors(), _metadata())
    write_sample(tmp_path, "c", _tensors(), _metadata(fps=30))
    path = write_manifest(tmp_path, "2.3")
    assert path == tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["ltx_lora_cache_version"] == 1 and manifest["model_version"] == "2.3"
    assert manifest["samples"][0] == {
        "file": "a.safetensors", "video_shape": [128, 2, 3, 4], "audio_shape": [8, 7, 16], "text_len": 5,
        "has_video_loss_mask": False, "reference_shape": None, "reference_downscale": None,
        "reference_temporal_scale": None, "caption": "a cat", "fps": 24.0,
    }
    assert [s["file"] for s in manifest["samples"]] == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert manifest["samples"][1]["audio_shape"] is None

    dataset = _open(tmp_path, require_audio=False)
    keys = [dataset.shape_key(i) for i in range(3)]
    assert len(set(keys)) == 3  # audio or not, and fps, each separate a batch
    assert keys[0] == ((128, 2, 3, 4), (8, 7, 16), 5, False, 24.0, None, None, None)


def _with_reference(frames=2, downscale=2, temporal_scale=1):
    tensors = _tensors()
    tensors["reference_latents"] = torch.randn(128, frames, 3, 2)
    return tensors, _metadata(reference_downscale=downscale, reference_temporal_scale=temporal_scale)


def test_reference_latents_round_trip_and_separate_batches(tmp_path):
    write_sample(tmp_path, "plain", _tensors(), _metadata())
    for name, frames, downscale in (("a", 2, 2), ("b", 2, 2), ("c", 1, 2), ("d", 2, 1)):
        write_sample(tmp_path, name, *_with_reference(frames, downscale))
    write_manifest(tmp_path, "2.3")
    entry = json.loads((tmp_path / "manifest.json").read_text())["samples"][0]
    assert (entry["reference_shape"], entry["reference_downscale"], entry["reference_temporal_scale"]) == (
        [128, 2, 3, 2], 2, 1)
    dataset = _open(tmp_path)
    names = [dataset[i]["name"] for i in range(len(dataset))]
    assert names == ["a", "b", "c", "d", "plain"]
    assert dataset[0]["reference_latents"].shape == (128, 2, 3, 2) and "reference_latents" not in dataset[4]
    keys = [dataset.shape_key(i) for i in range(len(dataset))]
    assert keys[0] == keys[1] and len(set(keys)) == 4  # reference shape, factors, or none: each its own batch


def test_ic_lora_needs_a_reference_for_every_sample_at_one_pair_of_factors(tmp_path):
    write_sample(tmp_path, "plain", _tensors(), _metadata())
    write_sample(tmp_path, "a", *_with_reference(downscale=2, temporal_scale=3))
    write_manifest(tmp_path, "2.3")
    with pytest.raises(CacheError, match=r"mode ic-lora needs a reference video for every sample, but 1 of 2 .*"
                                         r"\(e.g. plain\).*`references/` folder"):
        LatentCache(tmp_path, "2.3", DV, DA, require_audio=False, require_reference=True)
    write_sample(tmp_path, "plain", *_with_reference(downscale=1))
    write_manifest(tmp_path, "2.3")
    with pytest.raises(CacheError, match=r"different \(reference_downscale, reference_temporal_scale\) factors "
                                         r"\[\(1, 1\), \(2, 3\)\]"):
        LatentCache(tmp_path, "2.3", DV, DA, require_audio=False, require_reference=True)
    write_sample(tmp_path, "plain", *_with_reference(downscale=2, temporal_scale=3))
    write_manifest(tmp_path, "2.3")
    dataset = LatentCache(tmp_path, "2.3", DV, DA, require_audio=False, require_reference=True)
    assert dataset.reference_factors() == (2, 3)
    assert (dataset[0]["reference_downscale"], dataset[0]["reference_temporal_scale"]) == (2, 3)


def test_reference_latents_need_their_factors(tmp_path):
    tensors, metadata = _with_reference()
    with pytest.raises(ValueError, match="reference_latents and the metadata reference_downscale"):
        write_sample(tmp_path, "clip", tensors, _metadata())
    with pytest.raises(ValueError, match="reference_latents and the metadata reference_downscale"):
        write_sample(tmp_path, "clip", _tensors(), metadata)
    cache.save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "clip.safetensors"),
                    metadata={"ltx_lora_cache_version": "1", **{k: str(v) for k, v in _metadata().items()}})
    with pytest.raises(CacheError, match="clip.safetensors: metadata lacks reference_downscale, reference_temporal"):
        write_manifest(tmp_path, "2.3")
    write_sample(tmp_path, "clip", *_with_reference(downscale=0))
    with pytest.raises(CacheError, match="clip.safetensors: reference_downscale '0' is not a positive integer"):
        write_manifest(tmp_path, "2.3")


def _text(video_dim=DV, audio_dim=DA):
    return {k: v for k, v in _tensors(video_dim=video_dim, audio_dim=audio_dim).items() if "text" in k}


def test_empty_prompt_round_trip_and_refusals(tmp_path):
    _cache_with(tmp_path)
    with pytest.raises(CacheError, match="extras/empty_prompt.safetensors is missing .*re-run preprocessing"):
        _open(tmp_path).empty_prompt()
    text = _text()
    path = cache.write_empty_prompt(tmp_path, text, {"model_version": "2.3", "fingerprint": "f"})
    assert path == tmp_path / "extras" / "empty_prompt.safetensors"
    write_manifest(tmp_path, "2.3")  # not a sample: the manifest lists only clip
    assert [s["file"] for s in json.loads((tmp_path / "manifest.json").read_text())["samples"]] == ["clip.safetensors"]
    empty = _open(tmp_path).empty_prompt()
    assert set(empty) == set(text) and all(torch.equal(empty[k], text[k]) for k in text)
    assert empty["text_mask"].dtype == torch.int64

    cache.write_empty_prompt(tmp_path, _text(video_dim=64), {"model_version": "2.3", "fingerprint": "f"})
    with pytest.raises(CacheError, match="empty_prompt.safetensors: video_text_embeds is 64 wide but the target"):
        _open(tmp_path).empty_prompt()
    cache.write_empty_prompt(tmp_path, text, {"model_version": "2.0", "fingerprint": "f"})
    with pytest.raises(CacheError, match="empty_prompt.safetensors: made for LTX-2 but the target is LTX-2.3"):
        _open(tmp_path).empty_prompt()
    with pytest.raises(ValueError, match="the empty prompt needs exactly the tensors"):
        cache.write_empty_prompt(tmp_path, {**text, "video_latents": torch.zeros(1)}, {"model_version": "2.3",
                                                                                      "fingerprint": "f"})


def test_missing_directory_and_manifest(tmp_path):
    with pytest.raises(CacheError, match="does not exist.*data.synthetic"):
        _open(tmp_path / "nowhere")
    write_sample(tmp_path, "clip", _tensors(), _metadata())
    with pytest.raises(CacheError, match="manifest.json is missing.*re-run preprocessing"):
        _open(tmp_path)


def test_malformed_or_empty_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="not a valid manifest"):
        _open(tmp_path)
    write_manifest(tmp_path, "2.3")
    with pytest.raises(CacheError, match="lists no samples"):
        _open(tmp_path)


def test_manifest_listing_a_missing_file(tmp_path):
    _cache_with(tmp_path)
    (tmp_path / "clip.safetensors").unlink()
    with pytest.raises(CacheError, match="lists 'clip.safetensors', which is missing"):
        _open(tmp_path)


def test_wrong_model_version(tmp_path):
    _cache_with(tmp_path, metadata=_metadata(model_version="2.0"), model_version="2.0")
    with pytest.raises(CacheError, match="cache was made for LTX-2 but the target is LTX-2.3: re-run preprocessing"):
        _open(tmp_path, model_version="2.3")


def test_sample_file_of_another_model_version(tmp_path):
    write_sample(tmp_path, "clip", _tensors(), _metadata(model_version="2.0"))
    with pytest.raises(CacheError, match="clip.safetensors: made for LTX-2 but the target is LTX-2.3"):
        write_manifest(tmp_path, "2.3")


@pytest.mark.parametrize("key, dims", [("video_text_embeds", (4096, DA)), ("audio_text_embeds", (DV, 2048))])
def test_wrong_text_widths(tmp_path, key, dims):
    _cache_with(tmp_path, tensors=_tensors(video_dim=dims[0], audio_dim=dims[1]))
    with pytest.raises(CacheError, match=f"clip.safetensors: {key} is .* wide but the target takes"):
        _open(tmp_path)


def test_text_lengths_must_agree(tmp_path):
    tensors = _tensors()
    tensors["audio_text_embeds"] = torch.randn(4, DA)
    _cache_with(tmp_path, tensors=tensors)
    with pytest.raises(CacheError, match=r"audio_text_embeds has shape \[4, 16\], expected \[5, D\]"):
        _open(tmp_path)


def test_audio_required_but_missing(tmp_path):
    _cache_with(tmp_path, tensors=_tensors(audio_steps=None))
    with pytest.raises(CacheError, match="clip.safetensors: has no audio_latents but the training mode generates"):
        _open(tmp_path, require_audio=True)
    assert len(_open(tmp_path, require_audio=False)) == 1


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("video_latents", torch.randn(64, 2, 3, 4), r"video_latents has shape \[64, 2, 3, 4\], expected \[128, F"),
        ("video_latents", torch.randn(128, 0, 3, 4), r"video_latents has shape \[128, 0, 3, 4\]"),
        ("video_latents", torch.randn(128, 3, 4), r"video_latents has shape \[128, 3, 4\]"),
        ("audio_latents", torch.randn(8, 7, 12), r"audio_latents has shape \[8, 7, 12\], expected \[8, T, 16\]"),
        ("audio_latents", torch.randn(128, 7), r"audio_latents has shape \[128, 7\]"),
        ("video_loss_mask", torch.ones(2, 3, 5), r"video_loss_mask has shape \[2, 3, 5\], expected .*\[2, 3, 4\]"),
        ("reference_latents", torch.randn(64, 2, 3, 4), r"reference_latents has shape \[64, 2, 3, 4\], expected "
                                                        r"\[128, F', H', W'\]"),
        ("reference_latents", torch.randn(128, 3, 4), r"reference_latents has shape \[128, 3, 4\]"),
        ("text_mask", torch.ones(1, 5), r"text_mask has shape \[1, 5\], expected \[L\]"),
    ],
)
def test_malformed_shapes(tmp_path, key, value, message):
    tensors = _tensors()
    tensors[key] = value
    factors = {"reference_downscale": 1, "reference_temporal_scale": 1} if key == "reference_latents" else {}
    _cache_with(tmp_path, tensors=tensors, metadata=_metadata(**factors))
    with pytest.raises(CacheError, match="clip.safetensors: " + message):
        _open(tmp_path)


def test_bad_fps_and_stale_manifest(tmp_path):
    write_sample(tmp_path, "clip", _tensors(), _metadata(fps="fast"))
    with pytest.raises(CacheError, match="fps 'fast' is not a positive number"):
        write_manifest(tmp_path, "2.3")
    _cache_with(tmp_path)
    write_sample(tmp_path, "clip", _tensors(frames=3), _metadata())  # rewritten after the manifest
    with pytest.raises(CacheError, match="does not match clip.safetensors"):
        _open(tmp_path)


def test_unreadable_sample_file(tmp_path):
    _cache_with(tmp_path)
    (tmp_path / "clip.safetensors").write_bytes(b"garbage")
    with pytest.raises(CacheError, match="clip.safetensors: not a readable safetensors file"):
        _open(tmp_path)


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(cache, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_sample(tmp_path, "clip", _tensors(), _metadata())
    assert list(tmp_path.iterdir()) == []


def test_write_sample_refuses_incomplete_samples(tmp_path):
    tensors = _tensors()
    del tensors["text_mask"]
    with pytest.raises(ValueError, match="lacks text_mask, fps"):
        write_sample(tmp_path, "clip", tensors, {k: v for k, v in _metadata().items() if k != "fps"})
    with pytest.raises(ValueError, match="plain file name"):
        write_sample(tmp_path, "../clip", _tensors(), _metadata())
