"""`train.gradient_checkpointing: auto`: the plan from measured memory, the probes that measure it, the settings.

On the CPU there is no allocator peak to read, so the probes' tests stand in a meter: the bytes the autograd graph
saves for the backward (what a kept block holds until its backward), read through saved-tensor hooks."""

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

import trainer.train as train_module
from trainer.config import ConfigError, resolve
from trainer.data.batches import collate
from trainer.lora import lora_parameters
from trainer.memory_plan import (DEFAULT_BUDGET_SHARE, OFFLOAD_SHARE, MemoryPlan, blocks_held, measure_block_memory,
                                 plan_blocks)
from trainer.offload import LOOKAHEAD, offloaded_blocks
from trainer.models.registry import get_target
from trainer.performance import checkpoint_blocks

from tiny_training import lora_model, train_step

GIB = 2**30
# Measured on an H200, full-size LTX-2.3 at 6144 video tokens (docs/benchmarks.md): the peak with every block
# checkpointed, and what each kept block after the first adds (78.6 GiB with all 48 kept).
BASE, PER_BLOCK = int(43.1 * GIB), int((78.6 - 43.1) / 47 * GIB)


def _split(plan):
    return plan.kept, plan.offloaded, plan.checkpointed


def test_plan_keeps_everything_when_it_fits():
    assert plan_blocks(48, BASE, PER_BLOCK, budget=125 * GIB) == MemoryPlan(0, 0, 48, BASE + 47 * PER_BLOCK)


def test_predicted_peaks_match_the_peaks_measured_on_an_h200():
    budget = BASE + 35 * PER_BLOCK  # room for 36 blocks' activations: the first kept one is in the base
    twelve_checkpointed = plan_blocks(48, BASE, PER_BLOCK, budget, can_offload=False)
    twelve_offloaded = plan_blocks(48, BASE, PER_BLOCK, budget)
    assert _split(twelve_checkpointed) == (36, 0, 12) and _split(twelve_offloaded) == (36, 12, 0)
    assert abs(twelve_checkpointed.predicted_peak - 69.5 * GIB) < 0.5 * GIB
    assert abs(twelve_offloaded.predicted_peak - 69.1 * GIB) < 0.5 * GIB


def test_plan_keeps_what_fits_offloads_half_at_most_and_checkpoints_the_rest():
    budget = int(0.9 * 79.6 * GIB)  # an H100's 80 GB
    kept = (budget - BASE) // PER_BLOCK + 1
    plan = plan_blocks(48, BASE, PER_BLOCK, budget)
    assert plan == MemoryPlan(checkpointed=0, offloaded=48 - kept, kept=kept,
                              predicted_peak=BASE + (kept - 1) * PER_BLOCK)
    assert 36 <= kept <= 40 and plan.predicted_peak <= budget
    assert _split(plan_blocks(48, BASE, PER_BLOCK, budget=BASE + 20 * PER_BLOCK)) == (21, 24, 3)


def test_plan_without_offload_checkpoints_what_does_not_fit():
    assert _split(plan_blocks(48, BASE, PER_BLOCK, BASE + 30 * PER_BLOCK, can_offload=False)) == (31, 0, 17)


def test_plan_offloads_only_what_half_the_free_host_memory_holds():
    plan = plan_blocks(48, BASE, PER_BLOCK, budget=BASE + 30 * PER_BLOCK, host_available=7 * PER_BLOCK)
    assert _split(plan) == (31, 3, 14)


def test_plan_offloads_no_more_than_fit_when_they_are_back_together():
    # Three blocks' activations fit, all kept: any offloaded block would come back beside the last kept ones.
    plan = plan_blocks(48, BASE, PER_BLOCK, budget=BASE + 2 * PER_BLOCK + 1)
    assert _split(plan) == (3, 0, 45) and plan.predicted_peak == BASE + 2 * PER_BLOCK
    # Six fit: 24 offloaded blocks (the most, half) spread so that no more than six are back at once.
    plan = plan_blocks(48, BASE, PER_BLOCK, budget=BASE + 5 * PER_BLOCK + 1)
    assert _split(plan) == (6, 24, 18) and blocks_held(48, 18, 24) == 6


def test_offloaded_blocks_are_spread_and_leave_the_last_blocks_alone():
    assert LOOKAHEAD == 4
    assert sorted(offloaded_blocks(0, 12, 48)) == [0, 3, 7, 11, 14, 18, 22, 25, 29, 33, 36, 40]
    assert offloaded_blocks(0, 48, 48) == set(range(48))
    assert offloaded_blocks(36, 12, 48) == set(range(36, 48))  # no room to spread them
    assert offloaded_blocks(0, 1, 2) == {0} and offloaded_blocks(1, 5, 2) == {1} and offloaded_blocks(2, 5, 2) == set()


def test_blocks_held_counts_kept_blocks_and_offloaded_ones_brought_back_beside_them():
    assert blocks_held(48, 0, 0) == 48 and blocks_held(48, 48, 0) == 1  # a checkpointed block's recomputation
    assert blocks_held(48, 0, 12) == 36  # spread: each comes back after kept blocks freed their memory
    assert blocks_held(48, 0, 48) == LOOKAHEAD + 1  # the block whose backward runs and those brought back ahead
    # Blocks 3, 4, 5 offloaded, 6 and 7 kept: the backward of block 7 runs with 3 to 6 already brought back.
    assert offloaded_blocks(3, 3, 8) == {3, 4, 5} and blocks_held(8, 3, 3) == 5


def test_plan_checkpoints_every_block_when_nothing_more_fits_or_a_kept_block_is_unmeasured():
    plan = plan_blocks(48, BASE, PER_BLOCK, budget=BASE - GIB)
    assert plan == MemoryPlan(checkpointed=48, offloaded=0, kept=0, predicted_peak=BASE)
    assert plan_blocks(48, BASE, None, budget=BASE + 60 * GIB) == plan


@pytest.mark.parametrize("can_offload", [True, False])
def test_every_plan_covers_every_block_and_stays_in_its_budget(can_offload):
    for extra in range(0, 60 * GIB, GIB // 3):
        plan = plan_blocks(48, BASE, PER_BLOCK, BASE + extra, can_offload=can_offload)
        assert plan.checkpointed + plan.offloaded + plan.kept == 48 and min(vars(plan).values()) >= 0
        assert plan.predicted_peak <= BASE + extra
        assert plan.offloaded <= math.floor(48 * OFFLOAD_SHARE)
        assert plan.kept >= 1  # the first kept block costs nothing beyond the base


class SavedBytesMeter:
    """Stands in for the CUDA allocator's peak: bytes saved for the backward since the last reset. Tensors a
    checkpointed block saves go to the checkpoint's own (inner) hooks and are not counted, as they are freed."""

    def __init__(self, monkeypatch):
        self.saved = 0
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: self.reset())
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.saved)

    def reset(self):
        self.saved = 0

    def hooks(self):
        def pack(tensor):
            self.saved += tensor.numel() * tensor.element_size()
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def _saved_by_one_step(model, meter):
    meter.reset()
    with meter.hooks():
        train_step(model)
    model.zero_grad(set_to_none=True)
    return meter.saved


def test_probes_measure_what_a_kept_block_adds_and_leave_every_block_checkpointed(monkeypatch):
    meter = SavedBytesMeter(monkeypatch)
    model = lora_model()
    blocks = len(model.transformer_blocks)
    checkpoint_blocks(model, 0)
    everything_kept = _saved_by_one_step(model, meter)
    checkpoint_blocks(model, blocks)
    every_block_checkpointed = _saved_by_one_step(model, meter)

    with meter.hooks():
        base, per_block = measure_block_memory(model, lambda: _saved_by_one_step(model, meter), torch.device("cpu"))
    assert base == every_block_checkpointed
    # The tiny model has two blocks, both kept in the second probe: one more than with every block checkpointed.
    assert blocks == 2 and per_block == everything_kept - every_block_checkpointed > 0
    assert _saved_by_one_step(model, meter) == every_block_checkpointed  # every block checkpointed again
    assert all(p.grad is None for p in lora_parameters(model))


def test_a_probe_out_of_memory_means_no_block_is_kept(monkeypatch):
    meter = SavedBytesMeter(monkeypatch)
    model = lora_model()
    calls = []

    def probe():
        calls.append(len(calls))
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        _saved_by_one_step(model, meter)

    with meter.hooks():
        base, per_block = measure_block_memory(model, probe, torch.device("cpu"))
    assert per_block is None and base > 0 and len(calls) == 2
    assert _saved_by_one_step(model, meter) == base


def _config(tmp_path, lora=None, **train):
    return resolve({
        "output_dir": str(tmp_path / "run"),
        "model": {"target": "tiny-ltx-2.3"},
        "lora": {"rank": 4, **(lora or {})},
        "train": {"steps": 2, "batch_size": 2, "gradient_checkpointing": "auto", **train},
        "data": {"cache_dir": str(tmp_path / "cache"),
                 "synthetic": {"num_samples": 3, "frames": 9, "height": 64, "width": 96}},
    })


def test_trainer_plan_measures_the_largest_sample_and_leaves_no_gradients(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    accelerator = Accelerator(cpu=True)
    dataset = train_module.open_dataset(cfg, get_target(cfg.model.target), accelerator)
    sample = dataset[0]
    video, audio, text = (math.prod(sample["video_latents"].shape[1:]), sample["audio_latents"].shape[1],
                          sample["text_mask"].shape[0])
    assert dataset.tokens(0) == video + audio + text
    assert dataset.tokens(0, audio=False, reference=True) == 2 * video + text  # the synthetic reference: same size

    meter = SavedBytesMeter(monkeypatch)
    model = lora_model()
    blocks = len(model.transformer_blocks)
    optimizer = torch.optim.AdamW(lora_parameters(model))
    optimizer_bytes = 2 * 4 * sum(p.numel() for p in lora_parameters(model))
    measured = []
    real_measure = train_module.measure_block_memory

    def measure(*args):
        measured.append(real_measure(*args))
        return measured[-1]

    monkeypatch.setattr(train_module, "measure_block_memory", measure)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=0))
    probed = []
    monkeypatch.setattr(train_module, "collate", lambda samples: probed.append(samples) or collate(samples))
    monkeypatch.setattr(dataset, "tokens", lambda i, **streams: 100 if i == 1 else 10)  # the second is the largest
    with meter.hooks():
        nothing_fits = train_module.plan_memory(cfg, accelerator, model, optimizer, dataset, fsdp=False)
    assert [[sample["name"] for sample in samples] for samples in probed] == [[dataset[1]["name"]] * 2]  # batch 2
    base, per_block = measured[-1]
    assert per_block > 0 and all(p.grad is None for p in lora_parameters(model))
    assert nothing_fits == MemoryPlan(blocks, 0, 0, base + optimizer_bytes)

    total = math.ceil((base + optimizer_bytes + per_block // 2) / DEFAULT_BUDGET_SHARE)  # room for one kept block
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total))
    with meter.hooks():
        one_kept = train_module.plan_memory(cfg, accelerator, model, optimizer, dataset, fsdp=False)
    assert measured[-1] == (base, per_block)  # the same probes, the same numbers
    assert (one_kept.kept, one_kept.checkpointed) == (1, blocks - 1)

    limited = _config(tmp_path, memory_limit_gib=(base + optimizer_bytes + per_block) / GIB)
    with meter.hooks():
        assert train_module.plan_memory(limited, accelerator, model, optimizer, dataset, fsdp=False).kept == 2


def test_auto_on_the_cpu_trains_with_no_block_checkpointed(tmp_path, monkeypatch):
    chosen = []
    real = train_module.checkpoint_blocks
    monkeypatch.setattr(train_module, "checkpoint_blocks",
                        lambda model, *args: chosen.append(args) or real(model, *args))
    result = train_module.train(_config(tmp_path), progress=False)
    assert result.final_step == 2 and chosen == [(0, 0)]


@pytest.mark.parametrize("train, message", [
    ({"offload_activations": 12}, "train.offload_activations = 12 cannot be combined with "
                                  "train.gradient_checkpointing = 'auto'"),
    ({"recompute_feedforward": True}, "train.recompute_feedforward = True cannot be combined"),
    ({"gradient_checkpointing": 12, "memory_limit_gib": 70}, "train.memory_limit_gib = 70.0 is only used by "
                                                             "train.gradient_checkpointing = 'auto' (it is 12)"),
])
def test_settings_that_auto_would_override_are_refused(tmp_path, train, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(tmp_path, **train)


@pytest.mark.parametrize("limit_gib, by_hand", [(1000.0, False), (1e-6, True)])
def test_a_planned_run_trains_exactly_as_the_same_split_set_by_hand(tmp_path, monkeypatch, caplog, limit_gib,
                                                                     by_hand):
    """The plan running as on a GPU: the probes change nothing (LoRA dropout draws random numbers, so a probe that
    drew from the run's generators would show), and the split they choose trains as when set by hand."""
    meter = SavedBytesMeter(monkeypatch)
    monkeypatch.setattr(train_module, "plans_memory", lambda cfg, device: cfg.train.gradient_checkpointing == "auto")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GIB))
    planned = _config(tmp_path / "planned", lora={"dropout": 0.1}, memory_limit_gib=limit_gib)
    with meter.hooks(), caplog.at_level("INFO", logger="ltx_lora"):
        planned_losses = train_module.train(planned, progress=False).losses
    kept = 0 if by_hand else 2
    assert f"{kept} blocks kept, 0 offloaded, {2 - kept} checkpointed" in caplog.text
    assert "first step: peak" in caplog.text

    explicit = _config(tmp_path / "explicit", lora={"dropout": 0.1}, gradient_checkpointing=by_hand)
    assert train_module.train(explicit, progress=False).losses == planned_losses
