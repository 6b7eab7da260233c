"""The order in which samples are seen: same-shape batches, reshuffled each epoch, fully determined by the seed.

Because the order is a pure function of (seed, epoch), a resumed run needs only the number of batches already
consumed to continue exactly where it stopped, and several processes can split the same global sequence.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

import torch


def epoch_batches(shape_keys: list[Hashable], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch: samples shuffled, grouped by shape (a batch must stack), cut into batches, batches shuffled."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    groups: dict[Hashable, list[int]] = {}
    for index in torch.randperm(len(shape_keys), generator=generator).tolist():
        groups.setdefault(shape_keys[index], []).append(index)
    batches = [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class BatchPlan:
    """Endless batches of sample indices for one process, from global batch number `start` on.

    Global batch k goes to process k % world_size, so each process sees its own share of every epoch.
    """

    def __init__(self, shape_keys: list[Hashable], batch_size: int, seed: int, start: int, rank: int, world_size: int):
        if not shape_keys:
            raise ValueError("the dataset is empty")
        self.shape_keys, self.batch_size, self.seed = shape_keys, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        k, epoch = 0, 0
        while True:
            for batch in epoch_batches(self.shape_keys, self.batch_size, self.seed, epoch):
                if k >= self.start and k % self.world_size == self.rank:
                    yield batch
                k += 1
            epoch += 1


# Numbers that hold for a whole batch: the RoPE time axis takes one fps, and reference positions one pair of factors.
BATCH_SCALARS = ("fps", "reference_downscale", "reference_temporal_scale")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks same-shape samples; the BATCH_SCALARS are one number per batch (batches are grouped by them)."""
    batch: dict[str, Any] = {"name": [s["name"] for s in samples]}
    for key in BATCH_SCALARS:
        values = {s.get(key) for s in samples}
        if len(values) != 1:
            raise ValueError(f"a batch mixes {key} values {sorted(values, key=str)}; batches are grouped by shape, "
                             f"fps and reference factors")
        value = values.pop()
        if value is not None:
            batch[key] = value
    for key, value in samples[0].items():
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack([s[key] for s in samples])
    return batch
