"""Several processes (torchrun, gloo on the CPU) train exactly as one process with as many accumulated micro-batches:
the same samples, the same noise, the same averaged gradients; with DDP, and with FSDP as configs/accelerate/fsdp.yaml
sets it up."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, name, processes, accumulation, fsdp=False, args=(), grad_clip=1.0, script=None, env=None,
         **train):
    config = {
        "output_dir": str(tmp_path / name),
        "model": {"target": "tiny-ltx-2.3"},
        "lora": {"rank": 4},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 2, "grad_clip": grad_clip},
        "train": {"steps": 4, "batch_size": 1, "gradient_accumulation_steps": accumulation, "log_every": 1,
                  "checkpoint_every": 4, "gradient_checkpointing": False, **train},
        "data": {"cache_dir": str(tmp_path / "cache"), "synthetic": {"num_samples": 6, "frames": 9, "height": 64,
                                                                     "width": 96}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    if fsdp:  # accelerate applies FSDP to GPU processes only: tests/fsdp_on_cpu.py keeps it on for CPU (gloo) ones
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", str(processes),
                    str(ROOT / "tests" / (script or "fsdp_on_cpu.py"))]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    *([str(ROOT / "tests" / script)] if script else ["-m", "trainer.cli"])]
    done = subprocess.run([*launcher, "train", str(path), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    # FSDP in CPU processes (gloo) exists only in these tests (accelerate applies FSDP to GPUs). Its teardown at exit
    # once aborted ("terminate called without an active exception", in CI) after the run had finished and exported;
    # such a run's outputs are whole and are checked below like any other. A failure before the export still fails.
    aborted_after_export = (fsdp and "terminate called without an active exception" in done.stderr
                            and f"exported {tmp_path / name / 'lora.safetensors'}" in done.stderr)
    assert done.returncode == 0 or aborted_after_export, done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return losses, load_file(tmp_path / name / "lora.safetensors"), done.stdout + done.stderr


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_train_as_one_process_with_twice_the_accumulation(tmp_path):
    one, lora_one, _ = _run(tmp_path, "one", processes=1, accumulation=2)
    two, lora_two, stdout = _run(tmp_path, "two", processes=2, accumulation=1)
    assert len(one) == 4 and two == pytest.approx(one, rel=1e-5)
    assert lora_two.keys() == lora_one.keys()
    for key, tensor in lora_one.items():
        torch.testing.assert_close(lora_two[key], tensor, rtol=1e-4, atol=1e-6)
    assert stdout.count("done: step 4") == 1  # only the main process reports


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_fsdp_two_processes_train_and_resume_as_one_process_with_twice_the_accumulation(tmp_path):
    # Each FSDP process accumulates two micro-batches (gradient sync held back for the first), the reference four;
    # gradient checkpointing is on, and the clip acts at three of the four steps (gradient norms 0.038 to 0.070):
    # all of it on the sharded blocks and parameters.
    settings = {"gradient_checkpointing": True, "grad_clip": 0.045}
    one, lora_one, _ = _run(tmp_path, "one", processes=1, accumulation=4, **settings)
    # Two steps (the checkpoint at step 2 is gathered from the shards), then resumed into the sharded model to step 4;
    # warmup lasts 2 steps, so the first part's learning rates do not depend on train.steps.
    _, _, first = _run(tmp_path, "fsdp", processes=2, accumulation=2, fsdp=True, args=["--set", "train.steps=2"],
                       **settings)
    assert first.count("FSDP: each of 2 blocks sharded over 2 processes") == 1  # FSDP ran (the first process logs)
    two, lora_two, output = _run(tmp_path, "fsdp", processes=2, accumulation=2, fsdp=True, args=["--resume"],
                                 **settings)
    assert "resuming from" in output and "(step 2)" in output
    # Sharded gradients are summed in another order than one process accumulates them; the DDP tolerances hold (on
    # the CPU the losses come out bit-identical, the LoRA within float32 rounding).
    assert len(one) == 4 and two == pytest.approx(one, rel=1e-5)
    assert lora_two.keys() == lora_one.keys()
    for key, tensor in lora_one.items():
        torch.testing.assert_close(lora_two[key], tensor, rtol=1e-4, atol=1e-6)
    assert output.count("done: step 4") == 1  # only the main process writes and reports


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_offloaded_activations_under_fsdp_give_the_same_loss_and_gradients(tmp_path):
    """FSDP2 gathers each block's weights as parameters for its forward: offload leaves those alone and moves only
    the activations."""
    from torch.distributed.fsdp import fully_shard

    from tiny_training import lora_model, train_step
    from trainer.performance import checkpoint_blocks

    plain = train_step(lora_model())
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    try:
        model = lora_model()
        offload = checkpoint_blocks(model, 0, offloaded=1)
        offload.min_bytes = 0  # the tiny model's tensors are all small
        for block in model.transformer_blocks:
            fully_shard(block)
        fully_shard(model)
        loss, grads = train_step(model)
    finally:
        torch.distributed.destroy_process_group()
    assert offload.offloaded_bytes > 0
    assert loss == plain[0]
    for got, want in zip(grads, plain[1]):
        torch.testing.assert_close(got.full_tensor(), want, rtol=0, atol=0)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("fsdp", [False, True])
def test_processes_share_one_memory_plan_and_train_as_one_process(tmp_path, fsdp):
    """`gradient_checkpointing: auto` planned as on GPUs (tests/plan_on_cpu.py). Under DDP nothing runs out of memory
    and both processes keep both blocks, switching off the checkpointing the probes used; under FSDP the second
    process runs out of memory in a probe, so both must checkpoint every block, though the first measured room."""
    one, lora_one, _ = _run(tmp_path, "one", processes=1, accumulation=2)
    env = {"PLAN_OUT_OF_MEMORY_RANK": "1"} if fsdp else {}
    two, lora_two, output = _run(tmp_path, "two", processes=2, accumulation=1, fsdp=fsdp, script="plan_on_cpu.py",
                                 env=env, gradient_checkpointing="auto")
    kept = 0 if fsdp else 2
    plans = sorted(re.findall(r"PLAN of process (\d): (\d+ blocks kept, \d+ offloaded, \d+ checkpointed)", output))
    assert [process for process, _ in plans] == ["0", "1"] and plans[0][1] == plans[1][1]  # the same on both
    assert plans[0][1].startswith(f"{kept} blocks kept, 0 offloaded, {2 - kept} checkpointed")
    assert output.count("INFO memory plan (budget") == 1  # logged by the first process only
    assert output.count("keeping 2 blocks ran out of GPU memory") == (2 if fsdp else 0)
    assert two == pytest.approx(one, rel=1e-5)
    for key, tensor in lora_one.items():
        torch.testing.assert_close(lora_two[key], tensor, rtol=1e-4, atol=1e-6)


def test_fsdp_refuses_what_it_cannot_do_naming_the_keys():
    from types import SimpleNamespace

    from trainer.config import ConfigError, resolve
    from trainer.train import check_fsdp

    def accelerator(**plugin):
        return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(**plugin)))

    supported = {"fsdp_version": 2, "activation_checkpointing": False}
    cfg = resolve({"output_dir": "unused", "model": {"target": "tiny-ltx-2.3"}, "data": {"cache_dir": "unused"}})
    check_fsdp(cfg, accelerator(**supported))  # configs/accelerate/fsdp.yaml with the defaults: accepted
    sampling = resolve({**cfg.dump(), "validation": {"prompts": ["a red square"]}})
    with pytest.raises(ConfigError, match=r"validation is not supported with FSDP.*validation\.prompts"):
        check_fsdp(sampling, accelerator(**supported))
    with pytest.raises(ConfigError, match=r"fsdp_version 1 .*only FSDP2"):
        check_fsdp(cfg, accelerator(fsdp_version=1, activation_checkpointing=False))
    with pytest.raises(ConfigError, match=r"fsdp_activation_checkpointing.*train\.gradient_checkpointing"):
        check_fsdp(cfg, accelerator(fsdp_version=2, activation_checkpointing=True))
    with pytest.raises(ConfigError, match=r"optim\.optimizer = 'adamw8bit'"):
        check_fsdp(resolve({**cfg.dump(), "optim": {"optimizer": "adamw8bit"}}), accelerator(**supported))
    with pytest.raises(ConfigError, match=r"train\.fp8 is not supported with FSDP"):
        check_fsdp(resolve({**cfg.dump(), "train": {"fp8": True}}), accelerator(**supported))
