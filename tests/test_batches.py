"""Data order: same-shape batches, every sample once per epoch, reproducible, resumable, split across processes."""

import itertools

import pytest
import torch

from trainer.data.batches import BatchPlan, collate, epoch_batches

KEYS = [("a",)] * 5 + [("b",)] * 4  # two shapes


def test_epoch_covers_every_sample_once_in_same_shape_batches():
    batches = epoch_batches(KEYS, batch_size=2, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(KEYS)))
    assert all(len({KEYS[i] for i in b}) == 1 for b in batches)
    assert all(1 <= len(b) <= 2 for b in batches)


def test_order_depends_on_seed_and_epoch_only():
    assert epoch_batches(KEYS, 2, seed=1, epoch=0) == epoch_batches(KEYS, 2, seed=1, epoch=0)
    assert epoch_batches(KEYS, 2, seed=1, epoch=0) != epoch_batches(KEYS, 2, seed=1, epoch=1)
    assert epoch_batches(KEYS, 2, seed=1, epoch=0) != epoch_batches(KEYS, 2, seed=2, epoch=0)


def test_plan_resumes_mid_stream_and_splits_across_processes():
    whole = list(itertools.islice(BatchPlan(KEYS, 2, seed=3, start=0, rank=0, world_size=1), 20))
    resumed = list(itertools.islice(BatchPlan(KEYS, 2, seed=3, start=7, rank=0, world_size=1), 13))
    assert resumed == whole[7:]
    rank0 = list(itertools.islice(BatchPlan(KEYS, 2, seed=3, start=0, rank=0, world_size=2), 10))
    rank1 = list(itertools.islice(BatchPlan(KEYS, 2, seed=3, start=0, rank=1, world_size=2), 10))
    assert rank0 == whole[0::2] and rank1 == whole[1::2]


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="empty"):
        BatchPlan([], 1, 0, 0, 0, 1)


def test_collate_stacks_and_refuses_mixed_fps():
    sample = {"video_latents": torch.randn(2, 3), "fps": 24.0, "name": "x"}
    batch = collate([sample, {**sample, "name": "y"}])
    assert batch["video_latents"].shape == (2, 2, 3) and batch["fps"] == 24.0 and batch["name"] == ["x", "y"]
    with pytest.raises(ValueError, match=r"mixes fps values \[24.0, 25.0\]"):
        collate([sample, {**sample, "fps": 25.0}])


def test_collate_carries_one_pair_of_reference_factors_and_refuses_a_mix():
    sample = {"video_latents": torch.randn(2, 3), "fps": 24.0, "name": "x", "reference_latents": torch.randn(1),
              "reference_downscale": 2, "reference_temporal_scale": 3}
    batch = collate([sample, {**sample, "name": "y"}])
    assert (batch["reference_downscale"], batch["reference_temporal_scale"]) == (2, 3)
    assert "reference_downscale" not in collate([{"video_latents": torch.randn(1), "fps": 24.0, "name": "z"}])
    with pytest.raises(ValueError, match=r"mixes reference_downscale values \[1, 2\]"):
        collate([sample, {**sample, "reference_downscale": 1}])
