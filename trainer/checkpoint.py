"""Training checkpoints: adapter, optimizer, scheduler, RNG states and progress, on disk without pickles.

A checkpoint is a folder `checkpoints/step-00000100/` holding `adapter.safetensors` (the PEFT-layout LoRA, fp32,
exact), `optimizer.safetensors` (every optimizer tensor), `rng.safetensors` and `state.json` (step, scheduler,
optimizer hyper-parameters, the run's identity). It is written under a temporary name and renamed when complete, so
a crash never leaves a half-written checkpoint where resume would find it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.lora import DTensor, full_tensor

CHECKPOINT_FORMAT = 1
_PREFIX = "step-"
_TMP_SUFFIX = ".partial"
_FILES = ("adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the folder and the problem."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    adapter: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng: dict[str, torch.Tensor]
    identity: dict[str, Any]


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (partial folders from a crash are not listed)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Splits `optimizer.state_dict()` into tensors (for safetensors) and JSON-able scalars."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with every tensor whole. Under FSDP each process holds a shard of each parameter's
    state (DTensors), gathered here onto the CPU one tensor at a time: call it on every process, not only the one
    that writes."""
    state = optimizer.state_dict()
    gathered = {index: {name: full_tensor(value).cpu() if isinstance(value, DTensor) else value
                        for name, value in param_state.items()}
                for index, param_state in state["state"].items()}
    return {"state": gathered, "param_groups": state["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Loads a `full_optimizer_state` (as saved); under FSDP each parameter's state is first cut into the shards of
    that parameter (a collective: every process calls it)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for index, param_state in state["state"].items():
        param = params[int(index)]
        if isinstance(param, DTensor):
            from torch.distributed.tensor import distribute_tensor

            param_state = {name: distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
                           if isinstance(value, torch.Tensor) and value.shape == param.shape else value
                           for name, value in param_state.items()}
        sharded[index] = param_state
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


def capture_rng() -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = state
    return rng


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"])
    cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    adapter: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    identity: dict[str, Any],
    keep_last: int,
) -> Path:
    """Writes the checkpoint of `step` atomically, then deletes all but the newest `keep_last`. `adapter` and
    `optimizer_state` are whole (`get_lora_state_dict`, `full_optimizer_state`), so one process writes them."""
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    partial = root / (final.name + _TMP_SUFFIX)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    optim_tensors, optim_meta = _flatten_optimizer(optimizer_state)
    save_file({k: v.contiguous() for k, v in adapter.items()}, partial / "adapter.safetensors")
    save_file(optim_tensors, partial / "optimizer.safetensors")
    save_file(capture_rng(), partial / "rng.safetensors")
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "identity": identity,
        "optimizer": optim_meta,
        "scheduler": scheduler.state_dict(),
    }
    (partial / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Reads and checks a checkpoint folder; any missing, truncated or malformed part is a CheckpointError."""
    path = Path(path)
    missing = [name for name in _FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        adapter = load_file(path / "adapter.safetensors")
        optim_tensors = load_file(path / "optimizer.safetensors")
        rng = load_file(path / "rng.safetensors")
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt ({exc}); delete it to resume from an earlier one") from None
    if state.get("format") != CHECKPOINT_FORMAT or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {path}: state.json is not a format-{CHECKPOINT_FORMAT} ltx-lora checkpoint")
    if "torch" not in rng:
        raise CheckpointError(f"checkpoint {path}: rng.safetensors has no 'torch' state")
    bad = [k for k, v in adapter.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint {path}: adapter tensors contain NaN/inf, e.g. {bad[0]}")
    return Checkpoint(
        path=path,
        step=state["step"],
        adapter=adapter,
        optimizer_state=_unflatten_optimizer(optim_tensors, state["optimizer"]),
        scheduler_state=state["scheduler"],
        rng=rng,
        identity=state["identity"],
    )


def check_identity(checkpoint: Checkpoint, identity: dict[str, Any]) -> None:
    """Resuming must continue the same adapter: same model target, rank, alpha and adapted modules."""
    differences = [
        f"{key}: checkpoint has {checkpoint.identity.get(key)!r}, config gives {value!r}"
        for key, value in identity.items()
        if checkpoint.identity.get(key) != value
    ]
    if differences:
        raise CheckpointError(
            f"cannot resume from {checkpoint.path}: the config describes a different adapter\n  "
            + "\n  ".join(differences)
            + "\nrestore the original settings, or train into a new output_dir"
        )
