"""The configs shipped in configs/: each real-model config names its mode in its opening comment and is valid once
its weights exist."""

from pathlib import Path

import pytest
import yaml

from trainer.config import resolve

CONFIGS = sorted(p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml") if p.name != "smoke.yaml")


def test_there_are_real_model_configs_for_both_targets():
    targets = {yaml.safe_load(p.read_text())["model"]["target"] for p in CONFIGS}
    assert targets == {"ltx-2.3", "ltx-2"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_real_model_config_documents_its_mode_and_resolves(tmp_path, path):
    text = path.read_text()
    raw = yaml.safe_load(text)
    assert text.startswith(f"# mode: {raw['mode']}.")
    # The weights it names, stood in for by empty files: the schema checks that they exist.
    (tmp_path / "checkpoint.safetensors").touch()
    (tmp_path / "gemma").mkdir()
    raw["model"].update(checkpoint=str(tmp_path / "checkpoint.safetensors"), text_encoder=str(tmp_path / "gemma"))
    cfg = resolve(raw)
    assert cfg.mode == raw["mode"] and cfg.model.target == raw["model"]["target"]
