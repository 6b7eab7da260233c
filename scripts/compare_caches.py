"""Compares two latent caches made from the same data (e.g. by one process and by several under `accelerate launch`):
the same samples, each with the same tensors and metadata, latents within a tolerance. Exit status 1 on a difference.

    python scripts/compare_caches.py CACHE_A CACHE_B [--atol 1e-3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def _samples(cache: Path) -> dict[str, dict]:
    return {entry["file"]: entry for entry in json.loads((cache / "manifest.json").read_text())["samples"]}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--atol", type=float, default=1e-3)
    args = parser.parse_args()
    a, b = _samples(args.a), _samples(args.b)
    problems = [f"only in {args.a}: {name}" for name in sorted(set(a) - set(b))]
    problems += [f"only in {args.b}: {name}" for name in sorted(set(b) - set(a))]
    worst = 0.0
    for name in sorted(set(a) & set(b)):
        if a[name] != b[name]:
            problems.append(f"{name}: manifest entries differ")
        tensors_a, metadata_a = _read(args.a / name)
        tensors_b, metadata_b = _read(args.b / name)
        if metadata_a != metadata_b:
            problems.append(f"{name}: metadata differs")
        if set(tensors_a) != set(tensors_b):
            problems.append(f"{name}: tensors {sorted(tensors_a)} vs {sorted(tensors_b)}")
            continue
        for key, tensor in tensors_a.items():
            other = tensors_b[key]
            if tensor.shape != other.shape:
                problems.append(f"{name}: {key} shapes {list(tensor.shape)} vs {list(other.shape)}")
                continue
            difference = (tensor.double() - other.double()).abs().max().item() if tensor.numel() else 0.0
            worst = max(worst, difference)
            if difference > args.atol:
                problems.append(f"{name}: {key} differs by up to {difference:.3g}")
    print(f"{len(set(a) & set(b))} samples in both, largest difference {worst:.3g}")
    for problem in problems:
        print(problem)
    print("same" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
