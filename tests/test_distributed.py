"""Several processes (torchrun, gloo on the CPU) train exactly as one process with as many accumulated micro-batches:
the same samples, the same noise, the same averaged gradients."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file


def _run(tmp_path, name, processes, accumulation):
    config = {
        "output_dir": str(tmp_path / name),
        "model": {"target": "tiny-ltx-2.3"},
        "lora": {"rank": 4},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 2},
        "train": {"steps": 4, "batch_size": 1, "gradient_accumulation_steps": accumulation, "log_every": 1,
                  "checkpoint_every": 4, "gradient_checkpointing": False},
        "data": {"cache_dir": str(tmp_path / "cache"), "synthetic": {"num_samples": 6, "frames": 9, "height": 64,
                                                                     "width": 96}},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    done = subprocess.run([*launcher, "-m", "trainer.cli", "train", str(path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return losses, load_file(tmp_path / name / "lora.safetensors"), done.stdout


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_processes_train_as_one_process_with_twice_the_accumulation(tmp_path):
    one, lora_one, _ = _run(tmp_path, "one", processes=1, accumulation=2)
    two, lora_two, stdout = _run(tmp_path, "two", processes=2, accumulation=1)
    assert len(one) == 4 and two == pytest.approx(one, rel=1e-5)
    assert lora_two.keys() == lora_one.keys()
    for key, tensor in lora_one.items():
        torch.testing.assert_close(lora_two[key], tensor, rtol=1e-4, atol=1e-6)
    assert stdout.count("done: step 4") == 1  # only the main process reports
