"""Shared fixtures: tiny random models are cheap, so each test builds its own."""

import pytest
import torch

from trainer.models.registry import TARGETS, build_random_transformer


@pytest.fixture(params=["tiny-ltx-2.3", "tiny-ltx-2"])
def tiny_target(request):
    return TARGETS[request.param]


@pytest.fixture
def tiny_model():
    return build_random_transformer(TARGETS["tiny-ltx-2.3"], seed=0)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
