"""The synthetic cache: deterministic, in the cache format of each target, structured rather than constant."""

import json

import torch
from safetensors import safe_open

from trainer.data.cache import LatentCache
from trainer.data.synthetic import ensure_synthetic_cache, write_synthetic_cache
from trainer.models.registry import TARGETS


def _open(cache_dir, target, require_audio=True):
    return LatentCache(cache_dir, target.version, target.video_text_dim, target.audio_text_dim, require_audio)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    target = TARGETS["tiny-ltx-2.3"]
    write_synthetic_cache(tmp_path / "a", target, num_samples=3, seed=5)
    write_synthetic_cache(tmp_path / "b", target, num_samples=3, seed=5)
    write_synthetic_cache(tmp_path / "c", target, num_samples=3, seed=6)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    # Tensors and metadata, not file bytes: safetensors writes the metadata map in no fixed order.
    for name in ("sample_000.safetensors", "sample_002.safetensors"):
        with safe_open(str(tmp_path / "a" / name), "pt") as a, safe_open(str(tmp_path / "b" / name), "pt") as b:
            assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
            assert all(torch.equal(a.get_tensor(key), b.get_tensor(key)) for key in a.keys())
    a, c = _open(tmp_path / "a", target)[1], _open(tmp_path / "c", target)[1]
    assert not torch.equal(a["video_latents"], c["video_latents"])


def test_opens_for_each_tiny_target_with_the_requested_shapes(tmp_path, tiny_target):
    manifest = write_synthetic_cache(tmp_path, tiny_target, num_samples=4, latent_frames=5, latent_height=3,
                                     latent_width=7, audio_tokens=21, text_len=9, fps=25.0)
    assert manifest == tmp_path / "manifest.json"
    dataset = _open(tmp_path, tiny_target)
    assert len(dataset) == 4 and len({dataset.shape_key(i) for i in range(4)}) == 1
    for i in range(4):
        sample = dataset[i]
        assert sample["video_latents"].shape == (128, 5, 3, 7)
        assert sample["audio_latents"].shape == (8, 21, 16)
        assert sample["video_text_embeds"].shape == (9, tiny_target.video_text_dim)
        assert sample["audio_text_embeds"].shape == (9, tiny_target.audio_text_dim)
        assert sample["text_mask"].shape == (9,) and sample["text_mask"][0] == 1
        assert sample["fps"] == 25.0
    captions = [entry["caption"] for entry in json.loads(manifest.read_text())["samples"]]
    assert captions[3].startswith("synthetic sample 3: pattern speed ")


def test_latents_are_unit_scale_structured_and_vary_between_samples(tmp_path):
    target = TARGETS["tiny-ltx-2"]
    write_synthetic_cache(tmp_path, target, num_samples=4)
    samples = [_open(tmp_path, target)[i] for i in range(4)]
    for sample in samples:
        for key in ("video_latents", "audio_latents"):
            assert abs(sample[key].std().item() - 1) < 0.05 and abs(sample[key].mean().item()) < 0.05
        video = sample["video_latents"]
        # Every latent channel is a mix of the same two waves: the channel-by-token matrix has rank 2.
        assert torch.linalg.matrix_rank(video.flatten(1), rtol=1e-5) == 2
        # The waves move: consecutive frames differ.
        assert not torch.allclose(video[:, 0], video[:, 1])
        real = sample["text_mask"].bool()
        assert torch.all(sample["video_text_embeds"][~real] == 0) and sample["video_text_embeds"][real].std() > 0.5
    assert not torch.allclose(samples[0]["video_latents"], samples[1]["video_latents"])
    assert not torch.allclose(samples[0]["video_text_embeds"], samples[1]["video_text_embeds"])


def test_no_audio(tmp_path):
    target = TARGETS["tiny-ltx-2.3"]
    write_synthetic_cache(tmp_path, target, num_samples=2, audio_tokens=None)
    dataset = _open(tmp_path, target, require_audio=False)
    assert "audio_latents" not in dataset[0] and dataset.shape_key(0)[1] is None


def test_ensure_generates_only_when_the_manifest_is_missing(tmp_path):
    target = TARGETS["tiny-ltx-2.3"]
    manifest = ensure_synthetic_cache(tmp_path, target, num_samples=2)
    assert len(_open(tmp_path, target)) == 2
    before = manifest.read_bytes()
    assert ensure_synthetic_cache(tmp_path, target, num_samples=5) == manifest
    assert manifest.read_bytes() == before and len(list(tmp_path.glob("*.safetensors"))) == 2
