"""LoRA files: the same delta in every loader's rule, foreign layouts read right, broken files refused by name."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers.loaders.lora_pipeline import LTX2LoraLoaderMixin

from trainer import lora_files
from trainer.lora import get_lora_state_dict, inject_lora
from trainer.lora_files import (
    LoraFileError,
    convert_lora_file,
    describe_lora,
    merge_lora_into,
    read_lora,
    save_lora,
)
from trainer.models.registry import TARGETS, build_random_transformer

TARGET = TARGETS["tiny-ltx-2.3"]
RANK, ALPHA = 4, 8  # scale 2: a loader that ignores the fold would be off by a factor 2
METADATA = {"model_target": "tiny-ltx-2.3", "model_version": "2.3", "targets": "audio-video", "recipe": "",
            "mode": "t2v", "trigger_word": "sks"}


def _trained(targets="audio-video"):
    """A tiny model with an adapter whose lora_B is non-zero (a fresh adapter has B = 0 and would prove nothing)."""
    model = build_random_transformer(TARGET, seed=0)
    modules = inject_lora(model, rank=RANK, alpha=ALPHA, dropout=0.0, targets=targets)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    return model, modules


def _fused(model, modules):
    """Weights after PEFT itself merges its adapters: the reference every file must reproduce."""
    model.fuse_lora()
    named = dict(model.named_modules())
    return {m: named[m].base_layer.weight.detach().clone() for m in modules}


def _weights(model, modules):
    named = dict(model.named_modules())
    return {m: named[m].weight.detach().clone() for m in modules}


def _assert_weights(actual, expected):
    assert actual.keys() == expected.keys()
    for m in expected:
        torch.testing.assert_close(actual[m], expected[m], atol=1e-6, rtol=1e-5, msg=m)


def _merged_from_file(path, modules):
    base = build_random_transformer(TARGET, seed=0)
    merge_lora_into(base, read_lora(path))
    return _weights(base, modules)


def _via_diffusers(path, modules):
    """Loads the file the way `LTX2Pipeline.load_lora_weights` does, then fuses it with diffusers' own code."""
    state, metadata = LTX2LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    model = build_random_transformer(TARGET, seed=0)
    model.load_lora_adapter(state, prefix="transformer", metadata=metadata, adapter_name="file")
    return _fused(model, modules)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One trained adapter exported to ComfyUI: the file, the adapted modules, the PEFT-merged reference weights."""
    directory = tmp_path_factory.mktemp("export")
    model, modules = _trained()
    state = get_lora_state_dict(model)
    base = _weights(build_random_transformer(TARGET, seed=0), modules)
    manual = {m: base[m] + ALPHA / RANK * state[f"{m}.lora_B.weight"] @ state[f"{m}.lora_A.weight"] for m in modules}
    reference = _fused(model, modules)
    _assert_weights(reference, manual)  # PEFT's merge and W + alpha/r * B @ A agree
    comfy = directory / "lora.safetensors"
    save_lora(comfy, state, rank=RANK, alpha=ALPHA, fmt="comfyui", metadata=METADATA)
    return comfy, modules, reference


def test_comfyui_export_has_exact_keys_and_gives_the_trained_delta(exported):
    comfy, modules, reference = exported
    tensors = safetensors.torch.load_file(comfy)
    assert set(tensors) == {f"diffusion_model.{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    _assert_weights(_merged_from_file(comfy, modules), reference)

    # ComfyUI's rule: alpha/rank if a `.alpha` tensor exists, else 1. No alpha tensor, so B @ A must be the delta.
    base = _weights(build_random_transformer(TARGET, seed=0), modules)
    comfy_rule = {}
    for m in modules:
        key = f"diffusion_model.{m}"
        scale = tensors[f"{key}.alpha"].item() / RANK if f"{key}.alpha" in tensors else 1.0
        comfy_rule[m] = base[m] + scale * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
    _assert_weights(comfy_rule, reference)


def test_diffusers_conversion_and_diffusers_own_loader_agree(exported, tmp_path):
    comfy, modules, reference = exported
    diffusers_file = tmp_path / "pytorch_lora_weights.safetensors"
    convert_lora_file(comfy, diffusers_file, "diffusers")
    with safetensors.safe_open(diffusers_file, framework="pt") as f:
        keys, header = set(f.keys()), f.metadata()
    assert keys == {f"transformer.{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    config = json.loads(header["lora_adapter_metadata"])
    assert config["transformer.r"] == config["transformer.lora_alpha"] == RANK
    assert header["model_target"] == "tiny-ltx-2.3" and header["alpha"] == "8"  # metadata carried over

    lf = read_lora(diffusers_file)
    assert lf.format == "diffusers" and any("ComfyUI" in w for w in lf.warnings)
    _assert_weights(_merged_from_file(diffusers_file, modules), reference)
    # diffusers itself applies scale 1 to both files (it converts `diffusion_model.` keys on its own).
    _assert_weights(_via_diffusers(diffusers_file, modules), reference)
    _assert_weights(_via_diffusers(comfy, modules), reference)


def test_top_level_modules_get_lightricks_names_in_comfyui_files(tmp_path):
    model, modules = _trained(["proj_in", "time_embed.linear"])
    reference = _fused(model, modules)
    path = tmp_path / "top.safetensors"
    save_lora(path, get_lora_state_dict(model), rank=RANK, alpha=ALPHA, fmt="comfyui", metadata=METADATA)
    assert {k.rsplit(".lora_", 1)[0] for k in safetensors.torch.load_file(path)} == {
        "diffusion_model.patchify_proj", "diffusion_model.adaln_single.linear"}
    assert set(read_lora(path).modules) == set(modules)
    _assert_weights(_via_diffusers(path, modules), reference)  # diffusers maps the names back the same way


def test_foreign_comfyui_file_with_alpha_tensors_and_mixed_ranks(tmp_path):
    q, ff = "transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2"
    base = _weights(build_random_transformer(TARGET, seed=0), [q, ff])
    down_q, up_q = torch.randn(4, base[q].shape[1]), torch.randn(base[q].shape[0], 4)
    down_ff, up_ff = torch.randn(2, base[ff].shape[1]), torch.randn(base[ff].shape[0], 2)
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({
        f"diffusion_model.{q}.lora_down.weight": down_q, f"diffusion_model.{q}.lora_up.weight": up_q,
        f"diffusion_model.{q}.alpha": torch.tensor(16.0),
        f"diffusion_model.{ff}.lora_down.weight": down_ff, f"diffusion_model.{ff}.lora_up.weight": up_ff,
    }, path)
    expected = {q: base[q] + 4.0 * up_q @ down_q, ff: base[ff] + up_ff @ down_ff}  # 16/4, and no alpha: 1

    lf = read_lora(path)
    assert lf.format == "comfyui" and lf.warnings == []
    _assert_weights(_merged_from_file(path, [q, ff]), expected)
    converted = tmp_path / "pytorch_lora_weights.safetensors"
    convert_lora_file(path, converted, "diffusers")
    _assert_weights(_via_diffusers(converted, [q, ff]), expected)  # rank_pattern keeps rank 2 apart


def test_files_written_by_diffusers_keep_their_alpha(tmp_path):
    model, modules = _trained("video")
    config = model.peft_config["default"].to_dict()
    state = get_lora_state_dict(model)
    reference = _fused(model, modules)
    # The pipeline-level save of diffusers' training scripts: `transformer.` keys, prefixed metadata, alpha 8 != r 4.
    LTX2LoraLoaderMixin.save_lora_weights(tmp_path / "pipe", transformer_lora_layers=state,
                                          transformer_lora_adapter_metadata=config)
    pipeline_file = tmp_path / "pipe" / "pytorch_lora_weights.safetensors"
    _assert_weights(_merged_from_file(pipeline_file, modules), reference)
    _assert_weights(_via_diffusers(pipeline_file, modules), reference)
    # The model-level save: bare keys, unprefixed metadata.
    model.save_lora_adapter(tmp_path / "model", adapter_name="default")
    bare_file = tmp_path / "model" / "pytorch_lora_weights.safetensors"
    lf = read_lora(bare_file)
    assert lf.format == "peft" and any("no prefix" in w for w in lf.warnings)
    _assert_weights(_merged_from_file(bare_file, modules), reference)


def test_kohya_names_map_back_to_module_names(tmp_path):
    path = tmp_path / "kohya.safetensors"
    safetensors.torch.save_file({
        "lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(2, 32),
        "lora_unet_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(32, 2),
        "lora_unet_transformer_blocks_1_audio_ff_net_0_proj.lora_down.weight": torch.randn(2, 16),
        "lora_unet_transformer_blocks_1_audio_ff_net_0_proj.lora_up.weight": torch.randn(64, 2),
        "lora_unet_transformer_blocks_1_video_to_audio_attn_to_out_0.lora_down.weight": torch.randn(2, 16),
        "lora_unet_transformer_blocks_1_video_to_audio_attn_to_out_0.lora_up.weight": torch.randn(16, 2),
    }, path)
    lf = read_lora(path)
    assert lf.format == "kohya"
    assert set(lf.modules) == {"transformer_blocks.0.attn1.to_q", "transformer_blocks.1.audio_ff.net.0.proj",
                               "transformer_blocks.1.video_to_audio_attn.to_out.0"}


def _broken(tmp_path, tensors):
    path = tmp_path / "broken.safetensors"
    safetensors.torch.save_file(tensors, path)
    return path


def test_unreadable_files_are_refused_by_name(tmp_path, exported):
    truncated = tmp_path / "cut.safetensors"
    data = exported[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFileError, match=r"cut\.safetensors is a truncated"):
        read_lora(truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file at all")
    with pytest.raises(LoraFileError, match=r"notes\.safetensors is not a safetensors file"):
        read_lora(text)
    with pytest.raises(LoraFileError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors")


A, B = (f"diffusion_model.transformer_blocks.0.attn1.to_q.lora_{ab}.weight" for ab in "AB")


@pytest.mark.parametrize("tensors, problem", [
    ({f"diffusion_model.transformer_blocks.{i}.attn1.to_q.weight": torch.randn(4, 4) for i in range(12)},
     "looks like a base model"),
    ({A: torch.randn(4, 32)}, "lack their other half"),
    ({A: torch.randn(4, 32), B: torch.randn(32, 3)}, "rank mismatch in transformer_blocks.0.attn1.to_q"),
    ({A: torch.randn(4, 32), B: torch.full((32, 4), float("nan"))}, "contains NaN or inf"),
    ({A: torch.ones(4, 32, dtype=torch.int32), B: torch.randn(32, 4)}, "must be 2-D floating point"),
])
def test_broken_lora_contents_are_refused_with_the_problem(tmp_path, tensors, problem):
    with pytest.raises(LoraFileError) as err:
        read_lora(_broken(tmp_path, tensors))
    assert "broken.safetensors" in str(err.value) and problem in str(err.value)


def test_prefix_and_stray_keys_are_warned_about(tmp_path):
    path = _broken(tmp_path, {
        "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32),
        "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 4),
        "transformer.transformer_blocks.0.attn1.to_q.dora_scale": torch.randn(1, 32),
        "text_embedding_projection.aggregate_embed.lora_A.weight": torch.randn(4, 8),  # another layout: a connector
    })
    lf = read_lora(path)
    assert lf.format == "diffusers" and set(lf.modules) == {"transformer_blocks.0.attn1.to_q"}
    assert any("ComfyUI" in w and "ltx-lora export" in w for w in lf.warnings)
    assert any("2 keys" in w and "skipped" in w and "dora_scale" in w and "aggregate_embed" in w for w in lf.warnings)


def test_merge_refuses_a_lora_for_another_model(exported):
    model = build_random_transformer(TARGETS["tiny-ltx-2"], seed=0)  # no to_gate_logits, same widths
    lf = read_lora(exported[0])
    lf.modules["transformer_blocks.0.attn1.to_gate_logits"] = (torch.zeros(4, 32), torch.zeros(2, 4))
    lf.modules["transformer_blocks.0.attn1.to_q"] = (torch.zeros(4, 8), torch.zeros(32, 4))
    with pytest.raises(LoraFileError, match=r"lora\.safetensors does not fit") as err:
        merge_lora_into(model, lf)
    assert "to_gate_logits (not in the model)" in str(err.value)
    assert "to_q (weight (32, 32), LoRA delta (32, 8))" in str(err.value)


def test_describe_reports_rank_modules_groups_and_target(exported):
    comfy, modules, _ = exported
    report = describe_lora(read_lora(comfy))
    assert "rank:     4" in report and f"modules:  {len(modules)}" in report
    assert "tiny-ltx-2.3" in report and "trigger_word: sks" in report
    assert "video self-attn: 8" in report and "video-to-audio cross-attn (v2a): 8" in report  # 2 blocks x 4
    assert "blocks:   0-1 (2 blocks)" in report


def test_failed_save_leaves_neither_file_nor_temp(tmp_path, monkeypatch):
    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lora_files.safetensors.torch, "save_file", half_write)
    state = {"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 32),
             "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 4)}
    with pytest.raises(OSError, match="disk full"):
        save_lora(tmp_path / "out.safetensors", state, rank=4, alpha=4, fmt="comfyui", metadata={})
    assert list(tmp_path.iterdir()) == []
