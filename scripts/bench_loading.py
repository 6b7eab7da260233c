"""Benchmark: loading a full-size transformer from a single-file checkpoint, against reading the file raw.

Synthesises a full-size transformer (random bf16 weights, built on the GPU) as a transformer-only file in the
Lightricks layout (`model.diffusion_model.<original name>`), then, each in a fresh process so nothing is shared:
  raw    reads the whole file in 64 MiB chunks (what the disk and page cache allow)
  load   trainer.models.loading.load_transformer(path, bf16, "cuda")
and reports wall time and peak host memory: anonymous (what the loader itself holds) and resident file pages
(page cache mapped in, reclaimable). Usage, on a GPU machine with ~2x the file size free on disk and in RAM:

    python scripts/bench_loading.py --target ltx-2.3 --dir /tmp/bench --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# Diffusers -> original (Lightricks) names of the transformer's top-level modules and renamed parts.
_TOP = {
    "proj_in": "patchify_proj", "audio_proj_in": "audio_patchify_proj", "time_embed": "adaln_single",
    "audio_time_embed": "audio_adaln_single", "prompt_adaln": "prompt_adaln_single",
    "audio_prompt_adaln": "audio_prompt_adaln_single",
    "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
    "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
    "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
    "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single",
}
_PARTS = {
    "norm_q": "q_norm", "norm_k": "k_norm",
    "video_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_video",
    "audio_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_audio",
}


def original_name(name: str) -> str:
    head, *rest = name.split(".")
    return "model.diffusion_model." + ".".join([_TOP.get(head, head), *(_PARTS.get(p, p) for p in rest)])


def synthesise(target_name: str, path: Path, device: str) -> None:
    import torch
    from safetensors.torch import save_file

    from trainer.models.registry import TARGETS, build_random_transformer

    model = build_random_transformer(TARGETS[target_name], seed=0, dtype=torch.bfloat16, device=device)
    state = {original_name(k): v.detach().to("cpu", non_blocking=False).contiguous() for k, v in model.state_dict().items()}
    del model
    save_file(state, str(path), metadata={"model_version": "2.3.0" if target_name.endswith("2.3") else "2.0.0"})


class MemoryWatch:
    """Samples /proc/self/status every 20 ms for the peak anonymous and file-backed resident memory."""

    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(kind: str, path: Path, device: str) -> dict:
    """One measurement, run inside a fresh process."""
    import torch

    with MemoryWatch() as watch:
        started = time.perf_counter()
        if kind == "raw":
            with open(path, "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass
        else:
            from trainer.models.loading import load_transformer

            model = load_transformer(path, torch.bfloat16, device)
            if device == "cuda":
                torch.cuda.synchronize()
            assert not any(p.is_meta for p in model.parameters())
        seconds = time.perf_counter() - started
    return {"kind": kind, "seconds": seconds, **{f"peak_{k}_gib": v / 2**30 for k, v in watch.peak.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="ltx-2.3", choices=["ltx-2.3", "ltx-2", "tiny-ltx-2.3", "tiny-ltx-2"])
    parser.add_argument("--device", default="cuda", help="where the model is built and loaded (cpu for a dry run)")
    parser.add_argument("--dir", default="/tmp/bench-loading")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--measure", choices=["raw", "load"], help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()
    path = Path(args.dir) / f"{args.target}-random-transformer.safetensors"

    if args.measure:
        print(json.dumps(measure(args.measure, path, args.device)))
        return
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        started = time.perf_counter()
        synthesise(args.target, path, args.device)
        print(f"synthesised {path} ({path.stat().st_size / 2**30:.1f} GiB) in {time.perf_counter() - started:.0f} s")
    results = {"raw": [], "load": []}
    for _ in range(args.repeats):
        for kind in ("raw", "load"):
            out = subprocess.run([sys.executable, __file__, "--target", args.target, "--dir", args.dir, "--device", args.device,
                                  "--measure", kind],
                                 check=True, capture_output=True, text=True).stdout
            results[kind].append(json.loads(out.strip().splitlines()[-1]))
    size = path.stat().st_size / 2**30
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"card: {card}, torch {torch.__version__}, file {size:.2f} GiB, {args.target}")
    print("kind  median s  GiB/s   peak anon GiB  peak file-backed GiB   (runs)")
    for kind, runs in results.items():
        median = statistics.median(r["seconds"] for r in runs)
        anon = max(r["peak_RssAnon_gib"] for r in runs)
        mapped = max(r["peak_RssFile_gib"] for r in runs)
        print(f"{kind:<5} {median:8.1f} {size / median:6.2f} {anon:14.2f} {mapped:20.2f}   "
              f"({', '.join('%.1f' % r['seconds'] for r in runs)})")


if __name__ == "__main__":
    main()
