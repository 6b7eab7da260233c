"""Config validation: every error names the key, the bad value and what is accepted; recipes and --set layer."""

from pathlib import Path

import pytest
import yaml

from trainer.config import ConfigError, load_config, parse_override, resolve

BASE = {"output_dir": "runs/x", "model": {"target": "tiny-ltx-2.3"}, "data": {"cache_dir": "cache"}}


def _error(raw, overrides=()):
    with pytest.raises(ConfigError) as info:
        resolve(raw, list(overrides))
    return str(info.value)


def test_offload_set_by_hand_asks_for_checkpointing_set_by_hand_too():
    message = _error({**BASE, "train": {"offload_activations": 12}})
    assert ("train.offload_activations = 12 cannot be combined with train.gradient_checkpointing = 'auto' (the "
            "default)") in message and "give gradient_checkpointing true, false or a number of blocks" in message
    assert resolve({**BASE, "train": {"offload_activations": 12, "gradient_checkpointing": False}})


def test_defaults_follow_the_official_recipe():
    cfg = resolve(BASE)
    assert (cfg.lora.rank, cfg.lora_alpha, cfg.lora.dropout) == (32, 32.0, 0.0)
    assert cfg.optim.learning_rate == 1e-4 and cfg.optim.grad_clip == 1.0 and cfg.optim.final_lr_fraction == 0.1
    assert cfg.train.gradient_checkpointing == "auto" and cfg.train.batch_size == 1
    assert cfg.lora_targets == "video"
    assert resolve({**BASE, "mode": "text-to-audio-video"}).lora_targets == "audio-video"
    assert resolve({**BASE, "mode": "video-to-audio"}).lora_targets == "video-to-audio"
    assert resolve({**BASE, "mode": "audio-only"}).lora_targets == "audio"
    assert resolve({**BASE, "mode": "image-to-video"}).conditioning.first_frame_p == 0.1


def test_misspelt_key_is_named_with_a_suggestion():
    message = _error({**BASE, "lora": {"rnak": 8}})
    assert "lora.rnak: unknown key; did you mean 'rank'?" in message
    assert "rank, alpha, dropout, targets" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora.rank=0", "lora.rank = 0: Input should be greater than 0"),
        ("optim.learning_rate=-0.001", "optim.learning_rate = -0.001: Input should be greater than 0"),
        ("data.synthetic.frames=16", "data.synthetic.frames = 16: must be 8k+1"),
        ("data.synthetic.height=100", "data.synthetic.height = 100: must be a multiple of 32"),
        ("mode=dance", "mode = 'dance': Input should be 'text-to-video', 'text-to-audio-video', 'image-to-video'"),
        ("lora.targets=vidoe", "lora.targets = 'vidoe': must be 'auto', one of"),
        ("model.target=ltx-2.3", "model.target = 'ltx-2.3' needs its public weights"),
        ("recipe=fancy", "recipe = 'fancy': accepted: character, style, motion"),
        ("model.checkpoint=Lightricks/LTX-2.3", "model.checkpoint = 'Lightricks/LTX-2.3' does not exist. Nothing is "
                                                "downloaded at run time: fetch the weights first, e.g. `hf download"),
        ("model.text_encoder=/nowhere/gemma", "model.text_encoder = '/nowhere/gemma' does not exist. Nothing is "
                                              "downloaded at run time: fetch Gemma 3 12B first"),
    ],
)
def test_impossible_values_are_named(override, expected):
    assert expected in _error(BASE, [override])


def test_missing_section_is_named():
    assert "data: required key is missing" in _error({"output_dir": "x", "model": {"target": "tiny-ltx-2"}})


def test_set_overrides_yaml_and_recipe_fills_only_unset_fields():
    cfg = resolve({**BASE, "recipe": "style", "optim": {"learning_rate": 5e-5}}, ["lora.rank=4", "train.steps=7"])
    assert cfg.optim.learning_rate == 5e-5  # the user's value beats the recipe
    assert cfg.lora.rank == 4 and cfg.lora_alpha == 4.0  # alpha follows the rank when unset
    assert cfg.train.steps == 7
    motion = resolve({**BASE, "recipe": "motion"})
    assert motion.lora.rank == 8 and "attn1.to_q" in motion.lora_targets


def test_override_values_are_yaml_typed():
    assert parse_override("optim.betas=[0.8, 0.9]") == (["optim", "betas"], [0.8, 0.9])
    assert parse_override("train.gradient_checkpointing=false") == (["train", "gradient_checkpointing"], False)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("train.steps")


def test_load_config_reports_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**BASE, "train": {"stpes": 3}}))
    with pytest.raises(ConfigError, match=r"run\.yaml.*\n  train\.stpes: unknown key; did you mean 'steps'"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


CONFIGS = Path(__file__).parents[1] / "configs"
REAL_MODEL_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "smoke.yaml")


def test_the_smoke_config_is_valid_as_shipped():
    assert load_config(CONFIGS / "smoke.yaml").model.target == "tiny-ltx-2.3"


def test_there_are_real_model_configs_for_both_targets():
    assert {yaml.safe_load(p.read_text())["model"]["target"] for p in REAL_MODEL_CONFIGS} == {"ltx-2.3", "ltx-2"}


@pytest.mark.parametrize("path", REAL_MODEL_CONFIGS, ids=lambda p: p.name)
def test_a_real_model_config_documents_its_mode_and_resolves(tmp_path, path):
    text = path.read_text()
    raw = yaml.safe_load(text)
    assert text.startswith(f"# mode: {raw['mode']}.")
    # The weights it names, stood in for by an empty file and folder: the schema checks that they exist.
    (tmp_path / "checkpoint.safetensors").touch()
    (tmp_path / "gemma").mkdir()
    raw["model"].update(checkpoint=str(tmp_path / "checkpoint.safetensors"), text_encoder=str(tmp_path / "gemma"))
    cfg = resolve(raw)
    assert cfg.mode == raw["mode"] and cfg.model.target == raw["model"]["target"]


def test_every_schema_key_is_documented():
    from pathlib import Path

    from pydantic import BaseModel

    from trainer.config import RunConfig

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            yield prefix + name
            for candidate in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    yield from keys(candidate, f"{prefix}{name}.")

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    missing = [key for key in keys(RunConfig) if f"`{key}`" not in doc]
    assert not missing, f"undocumented config keys: {missing}"
