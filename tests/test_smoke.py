"""The smoke config runs the real path (demo media, tiny VAEs and text encoder, tiny transformer) in every mode."""

import json
import math
from pathlib import Path

import pytest

from trainer.cli import main
from trainer.modes import MODE_SPECS

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One demo dataset and cache for all modes: each mode re-encodes only what it needs differently."""
    return tmp_path_factory.mktemp("smoke")


@pytest.mark.parametrize("mode", sorted(MODE_SPECS))
def test_the_smoke_config_trains_in_every_mode_on_the_demo_data(shared, mode):
    run = shared / f"run-{mode}"
    overrides = {"mode": mode, "train.steps": 2, "train.log_every": 1, "output_dir": run,
                 "data.source": shared / "demo", "data.cache_dir": shared / "cache"}
    args = ["train", str(SMOKE)] + [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
    assert main(args) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    spec = MODE_SPECS[mode]
    assert ("video_loss" in records[-1]) == (spec.video == "generated")
    assert ("audio_loss" in records[-1]) == (spec.audio == "generated")
    assert (run / "smoke_lora.safetensors").is_file()
