"""The training loop end to end on tiny models: outputs, exact resume, refusal of bad input, NaN handling."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import trainer.train as train_module
from trainer.checkpoint import CheckpointError, list_checkpoints
from trainer.data.cache import CacheError
from trainer.cli import main
from trainer.config import ConfigError, resolve
from trainer.export import lora_metadata
from trainer.modes import MODE_SPECS
from trainer.train import TrainingDiverged, train


def _config(tmp_path, **sections):
    raw = {
        "output_dir": str(tmp_path / "run"),
        "model": {"target": "tiny-ltx-2.3"},
        "lora": {"rank": 4},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 2},
        "train": {"steps": 6, "batch_size": 2, "checkpoint_every": 2, "keep_last": 2, "log_every": 1,
                  "gradient_checkpointing": False},
        "data": {"cache_dir": str(tmp_path / "cache"), "synthetic": {"num_samples": 4, "frames": 9, "height": 64,
                                                                     "width": 96}},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_train_writes_config_metrics_checkpoints_and_exports(tmp_path, monkeypatch, capsys):
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path)))
    assert main(["train", str(config), "--set", "train.steps=5", "--set", "export.name=mine"]) == 0
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["steps"] == 5 and saved["export"]["name"] == "mine"
    assert len(_losses(run)) == 5 and all(math.isfinite(x) for x in _losses(run))
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004", "step-00000005"]  # keep_last = 2
    comfy = load_file(run / "mine.safetensors")
    assert comfy and all(k.startswith("diffusion_model.transformer_blocks.") for k in comfy)
    assert (run / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    assert "mine.safetensors" in capsys.readouterr().out


@pytest.mark.parametrize("target", ["tiny-ltx-2.3", "tiny-ltx-2"])
@pytest.mark.parametrize("mode", sorted(MODE_SPECS))
def test_every_mode_trains_on_both_targets(tmp_path, target, mode):
    cfg = resolve(_config(tmp_path, model={"target": target}, mode=mode, train={"steps": 1}))
    result = train(cfg, progress=False)
    assert result.final_step == 1 and all(math.isfinite(x) for x in result.losses)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    spec = MODE_SPECS[mode]
    assert ("video_loss" in record) == (spec.video == "generated")
    assert ("audio_loss" in record) == (spec.audio == "generated")


def _crash_at(monkeypatch, call, exception):
    """Makes the `call`-th step raise `exception`, as a crash or Ctrl-C would."""
    real = train_module.build_step_inputs
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise exception
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "build_step_inputs", flaky)


@pytest.mark.parametrize("crash, expected_checkpoint", [(RuntimeError("power cut"), 4), (KeyboardInterrupt(), 4)])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, crash, expected_checkpoint):
    reference = resolve(_config(tmp_path / "a"))
    uninterrupted = train(reference, progress=False)

    cfg = resolve(_config(tmp_path / "b"))
    _crash_at(monkeypatch, 5, crash)  # dies during step 5: the last checkpoint is step 4 (Ctrl-C saves step 4 too)
    with pytest.raises(type(crash)):
        train(cfg, progress=False)
    assert list_checkpoints(tmp_path / "b" / "run")[-1].name == f"step-{expected_checkpoint:08d}"
    monkeypatch.undo()
    resumed = train(cfg, resume=True, progress=False)

    assert resumed.final_step == 6
    assert _losses(tmp_path / "b" / "run") == _losses(tmp_path / "a" / "run")
    final_a = load_file(tmp_path / "a" / "run" / "lora.safetensors")
    final_b = load_file(tmp_path / "b" / "run" / "lora.safetensors")
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert uninterrupted.losses[-2:] == resumed.losses


def test_resume_with_a_different_adapter_is_refused_and_touches_nothing(tmp_path):
    train(resolve(_config(tmp_path)), progress=False)
    checkpoints = list_checkpoints(tmp_path / "run")
    before = {p: (p / "adapter.safetensors").read_bytes() for p in checkpoints}
    with pytest.raises(CheckpointError, match=r"rank: checkpoint has 4, config gives 8"):
        train(resolve(_config(tmp_path, lora={"rank": 8})), resume=True, progress=False)
    with pytest.raises(CheckpointError, match=r"model_target: checkpoint has 'tiny-ltx-2.3', config gives 'tiny-ltx-2'"):
        train(resolve(_config(tmp_path, model={"target": "tiny-ltx-2"})), resume=True, progress=False)
    assert list_checkpoints(tmp_path / "run") == checkpoints
    assert all((p / "adapter.safetensors").read_bytes() == data for p, data in before.items())


def test_corrupt_checkpoint_is_refused(tmp_path):
    cfg = resolve(_config(tmp_path))
    train(cfg, progress=False)
    adapter = list_checkpoints(tmp_path / "run")[-1] / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"step-00000006 is corrupt"):
        train(cfg, resume=True, progress=False)


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        train(resolve(_config(tmp_path)), resume=True, progress=False)


def test_unwritable_output_dir_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"output_dir = .*file/run.* cannot be written"):
        train(resolve(_config(tmp_path, output_dir=str(blocker / "run"))), progress=False)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch, caplog):
    real = train_module.compute_loss
    calls = {"n": 0}

    def poisoned(model, inputs):
        calls["n"] += 1
        loss, parts = real(model, inputs)
        return (loss * float("nan"), parts) if calls["n"] >= 3 else (loss, parts)

    monkeypatch.setattr(train_module, "compute_loss", poisoned)
    cfg = resolve(_config(tmp_path, train={"steps": 20, "max_bad_steps": 3}))
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps .* last good checkpoint is .*step-00000002"):
        train(cfg, progress=False)
    assert "step 3: non-finite loss or gradient" in caplog.text
    # Skipped steps leave the adapter as the last good step made it, and write no checkpoint.
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002"]


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.25, 0.5, 0.75, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1]),  # the final fraction is reached at `steps`
])
def test_learning_rate_schedule_warms_up_then_decays_to_the_final_fraction(tmp_path, schedule, expected):
    cfg = resolve(_config(tmp_path, optim={"schedule": schedule, "warmup_steps": 4}, train={"steps": 8}))
    assert [round(train_module.lr_factor(step, cfg), 6) for step in range(9)] == expected
    cosine = resolve(_config(tmp_path, optim={"schedule": "cosine", "warmup_steps": 0}, train={"steps": 8}))
    factors = [train_module.lr_factor(step, cosine) for step in range(9)]
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(0.1) and factors == sorted(factors, reverse=True)


def test_gradient_checkpointing_changes_memory_not_results(tmp_path):
    plain = train(resolve(_config(tmp_path / "a", train={"steps": 3})), progress=False)
    checkpointed = train(resolve(_config(tmp_path / "b", train={"steps": 3, "gradient_checkpointing": True})),
                         progress=False)
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-6)
    a, b = load_file(tmp_path / "a" / "run" / "lora.safetensors"), load_file(tmp_path / "b" / "run" / "lora.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_gradient_accumulation_runs_and_logs_the_mean_of_its_micro_batches(tmp_path, monkeypatch):
    real = train_module.compute_loss
    micro_losses = []

    def recording(model, inputs):
        loss, parts = real(model, inputs)
        micro_losses.append(loss.item())
        return loss, parts

    monkeypatch.setattr(train_module, "compute_loss", recording)
    cfg = resolve(_config(tmp_path, train={"steps": 2, "batch_size": 1, "gradient_accumulation_steps": 2}))
    train(cfg, progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(micro_losses) == 4
    assert [r["loss"] for r in records] == pytest.approx([sum(micro_losses[0:2]) / 2, sum(micro_losses[2:4]) / 2])


def test_8bit_adamw_without_bitsandbytes_names_the_fix(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    cfg = resolve(_config(tmp_path, optim={"optimizer": "adamw8bit"}))
    with pytest.raises(ConfigError, match=r"needs bitsandbytes: pip install 'ltx-lora\[bnb\]'"):
        train_module.build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, torch.device("cpu"))


def test_caption_dropout_replaces_text_with_the_empty_prompt():
    batch = {"video_text_embeds": torch.randn(64, 4, 3), "audio_text_embeds": torch.randn(64, 4, 2),
             "text_mask": torch.ones(64, 4, dtype=torch.long)}
    empty = {"video_text_embeds": torch.full((4, 3), 7.0), "audio_text_embeds": torch.full((4, 2), 7.0),
             "text_mask": torch.tensor([0, 0, 1, 1])}
    original = {k: v.clone() for k, v in batch.items()}
    train_module.drop_captions(batch, empty, 0.5, torch.Generator().manual_seed(0))
    dropped = (batch["video_text_embeds"] == 7.0).all(dim=(1, 2))
    assert 16 < dropped.sum() < 48  # about half of 64
    for key in batch:
        assert torch.equal(batch[key][dropped], empty[key].expand_as(batch[key][dropped]))
        assert torch.equal(batch[key][~dropped], original[key][~dropped])


def test_an_all_ones_text_mask_is_dropped_on_the_host_and_means_the_same_to_the_transformer():
    from tiny_training import lora_model, step_inputs

    padded = {"text_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]), "fps": 24.0}
    assert torch.equal(train_module.batch_to_device(padded, torch.device("cpu"))["text_mask"], padded["text_mask"])
    full = {"text_mask": torch.ones(2, 3, dtype=torch.long), "fps": 24.0}
    assert train_module.batch_to_device(full, torch.device("cpu")) == {"text_mask": None, "fps": 24.0}

    model, kwargs = lora_model(), step_inputs().model_kwargs
    assert kwargs["encoder_attention_mask"].all()  # the tiny step's mask is all ones
    with torch.no_grad():
        masked = model(**kwargs)
        unmasked = model(**{**kwargs, "encoder_attention_mask": None, "audio_encoder_attention_mask": None})
    for a, b in zip(masked, unmasked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_caption_dropout_needs_the_cached_empty_prompt(tmp_path):
    cfg = resolve(_config(tmp_path, train={"caption_dropout_p": 0.3}))  # a synthetic cache has no empty prompt
    with pytest.raises(CacheError, match=r"empty_prompt.safetensors is missing \(caption dropout needs it\)"):
        train(cfg, progress=False)


def test_ic_lora_records_its_reference_factors_and_refuses_a_cache_taken_at_others(tmp_path):
    result = train(resolve(_config(tmp_path, mode="ic-lora", train={"steps": 1})), progress=False)
    for path in result.exported:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        assert (metadata["reference_downscale_factor"], metadata["reference_temporal_scale_factor"]) == ("1", "1")
    assert "reference_downscale_factor" not in lora_metadata(resolve(_config(tmp_path, mode="image-to-video")))
    mismatched = resolve(_config(tmp_path, mode="ic-lora", data={"reference_downscale": 2}))
    with pytest.raises(ConfigError, match=r"references in .*cache were taken at \(data.reference_downscale, "
                                          r"data.reference_temporal_scale\) = \(1, 1\), the config says \(2, 1\)"):
        train(mismatched, progress=False)


def test_speed_switches_reach_the_model(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train_module, "checkpoint_blocks",
                        lambda model, blocks, offloaded: calls.append(("checkpoint", blocks, offloaded)))
    monkeypatch.setattr(train_module, "compile_blocks", lambda model, budget: calls.append(("compile", budget)))
    monkeypatch.setattr(train_module, "recompute_feedforward",
                        lambda model, blocks, after: calls.append(("ff", blocks, after)))
    train(resolve(_config(tmp_path / "a", train={"steps": 1, "gradient_checkpointing": 1})), progress=False)
    assert calls == [("checkpoint", 1, 0), ("ff", 0, 1)]  # compile: auto is off on the CPU
    calls.clear()
    train(resolve(_config(tmp_path / "c", train={"steps": 1, "gradient_checkpointing": 1,
                                                 "recompute_feedforward": True, "offload_activations": True})),
          progress=False)
    assert calls == [("checkpoint", 1, 2), ("ff", 2, 1)]  # all blocks after the checkpointed one
    calls.clear()
    train(resolve(_config(tmp_path / "b", train={"steps": 1, "gradient_checkpointing": True, "compile": True,
                                                 "activation_memory_budget": 0.4})), progress=False)
    assert calls == [("checkpoint", 2, 0), ("ff", 0, 2), ("compile", 0.4)]  # true: all blocks of the tiny model


def test_offloaded_activations_train_the_same_and_say_how_much_went_to_the_host(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    plain = train(resolve(_config(tmp_path / "a", train={"steps": 2})), progress=False)
    offloaded = train(resolve(_config(tmp_path / "b", train={"steps": 2, "gradient_checkpointing": 1,
                                                               "offload_activations": True})), progress=False)
    assert offloaded.losses == pytest.approx(plain.losses, rel=1e-6)
    assert "activation offload on 1 of 2 blocks" in caplog.text
    assert "train.offload_activations on the CPU copies activations into the memory they are already in" in caplog.text
    assert caplog.text.count("GiB of pinned host memory per micro-batch") == 1  # after the first step only


def test_triton_kernels_train_the_same_as_sdpa(tmp_path, monkeypatch):
    """`kernels: triton` routes the attentions through the fused kernel (Triton's interpreter here) and trains to
    the same losses as PyTorch's attention."""
    import ltx_kernels.install

    calls = []
    fused = ltx_kernels.install.fused_attention
    monkeypatch.setattr(ltx_kernels.install, "fused_attention", lambda *a, **k: calls.append(1) or fused(*a, **k))
    sdpa = train(resolve(_config(tmp_path / "a", kernels="sdpa", train={"steps": 2})), progress=False)
    assert not calls
    triton = train(resolve(_config(tmp_path / "b", kernels="triton", train={"steps": 2})), progress=False)
    assert calls and triton.losses == pytest.approx(sdpa.losses, rel=1e-4)
