"""Shared fixtures: tiny random models are cheap, so each test builds its own. Without a GPU the Triton kernels run
in Triton's interpreter on the CPU (set before anything imports triton)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
