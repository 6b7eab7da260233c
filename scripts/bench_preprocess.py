"""Benchmark: preprocessing throughput (clips/s and seconds of video per second), and decoding alone as the baseline.

Writes N clips with sound (H.264 + AAC, `--frames` frames at `--size` WxH, 24 fps), then measures, on the same clips:
  decode         media.probe + decode_frames + read_audio + log_mel per clip, one after another (the CPU's share)
  encode         pixels to [-1, 1] on the device, then the VAEs, on already decoded clips (the GPU's share)
  preprocess/N   the whole `ltx-lora preprocess` path into an empty cache, N decode threads (data.decode_threads)
Decoding is not the bottleneck when preprocess/N approaches encode.
Components: `--vaes tiny` uses the tiny random VAEs (CPU runs); `--vaes full` builds full-size video and audio VAEs
with random weights (speed does not depend on weight values) on the GPU, video VAE in bf16, audio VAE in fp32.
The text path is the tiny one in both cases: each caption is encoded once, so it is not what limits throughput.

    python scripts/bench_preprocess.py --vaes tiny --clips 4 --frames 25 --size 192x128          # CPU
    python scripts/bench_preprocess.py --vaes full --clips 8 --frames 121 --size 768x512          # GPU
    python scripts/bench_preprocess.py --vaes full --clips 8 --frames 121 --size 768x512 --source 1280x720
                                                        # sources larger than the bucket: resized while decoding
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from trainer.config import resolve
from trainer.data import media
from trainer.data.preprocess import preprocess
from trainer.models.components import TINY_TEXT_TOKENS, Components, encode_audio, encode_video
from trainer.models.registry import TARGETS
from trainer.models.text import PromptEncoder
from trainer.models.tiny import build_tiny_components

# Production video VAE encoder (diffusers names; the LTX-2 release's values). Only the encoder runs here.
FULL_VIDEO_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 128,
    "block_out_channels": (256, 512, 1024, 2048), "decoder_block_out_channels": (256, 512, 1024),
    "layers_per_block": (4, 6, 6, 2, 2), "decoder_layers_per_block": (5, 5, 5, 5),
    "spatio_temporal_scaling": (True, True, True, True), "decoder_spatio_temporal_scaling": (True, True, True),
    "decoder_inject_noise": (False, False, False, False),
    "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    "upsample_residual": (True, True, True), "upsample_factor": (2, 2, 2), "timestep_conditioning": False,
    "patch_size": 4, "patch_size_t": 1, "resnet_norm_eps": 1e-6, "encoder_causal": True, "decoder_causal": False,
    "spatial_compression_ratio": 32, "temporal_compression_ratio": 8,
}


def write_clips(root: Path, count: int, frames: int, width: int, height: int, fps: int = 24) -> None:
    """Moving gradients with a tone, captioned: enough texture that the codec does real work."""
    rate = 48000
    y, x = np.mgrid[0:height, 0:width]
    for c in range(count):
        path = root / f"clip_{c:03d}.mp4"
        with av.open(str(path), "w") as container:
            video = container.add_stream("libx264", rate=fps)
            video.width, video.height, video.pix_fmt = width, height, "yuv420p"
            sound = container.add_stream("aac", rate=rate, layout="stereo")
            for k in range(frames):
                shift = (k * (c + 1) * 4) % width
                pixels = np.stack([(x + shift) % 256, (y + k) % 256, (x + y + c * 40) % 256], -1).astype(np.uint8)
                container.mux(video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            container.mux(video.encode())
            t = np.arange(round(frames / fps * rate)) / rate
            wave = (0.3 * np.sin(2 * np.pi * (220 + 40 * c) * t)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.repeat(wave, 2)[None], format="flt", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
            container.mux(sound.encode(frame))
            container.mux(sound.encode())
        (root / f"clip_{c:03d}.txt").write_text(f"a moving gradient number {c} with a tone")


def components(kind: str, device: torch.device) -> Components:
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video

    target = TARGETS["tiny-ltx-2.3"]
    tiny = build_tiny_components(target)
    encoder = PromptEncoder(tiny.tokenizer, tiny.text_encoder.to(device), tiny.connectors.to(device), target,
                            max_length=TINY_TEXT_TOKENS)
    if kind == "tiny":
        return Components(tiny.video_vae.to(device), tiny.audio_vae.to(device), encoder)
    video_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    video_vae = AutoencoderKLLTX2Video(**FULL_VIDEO_VAE).to(device, video_dtype).eval()
    audio_vae = AutoencoderKLLTX2Audio().to(device, torch.float32).eval()  # class defaults: the released layout
    return Components(video_vae, audio_vae, encoder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vaes", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--size", default="192x128", help="WxH of the bucket")
    parser.add_argument("--source", default=None, help="WxH of the clips (default: the bucket's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", default="2", help="decode thread counts to time, e.g. 1,2,4")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    source_width, source_height = (int(v) for v in (args.source or args.size).split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    (work / "clips").mkdir()
    started = time.perf_counter()
    write_clips(work / "clips", args.clips, args.frames, source_width, source_height)
    print(f"wrote {args.clips} clips of {args.frames} frames at {source_width}x{source_height} in "
          f"{time.perf_counter() - started:.1f} s")

    bucket = f"{width}x{height}x{args.frames}"
    built = components(args.vaes, device)
    seconds_of_video = args.clips * args.frames / 24.0
    threads = [int(t) for t in args.threads.split(",")]
    times: dict[str, list[float]] = {"decode": [], "encode": [], **{f"preprocess/{t}": [] for t in threads}}

    def timed(run) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for repeat in range(args.repeats + 1):  # the first round warms up (kernels, caches)
        decoded = []

        def decode():
            for path in sorted((work / "clips").glob("*.mp4")):
                info = media.probe(path)
                frames = media.decode_frames(info, media.parse_bucket(bucket), 24.0)
                decoded.append((frames, media.log_mel(media.read_audio(path, 0.0, args.frames / 24.0))))

        def encode():
            for frames, mel in decoded:
                encode_video(built.video_vae, media.to_model_range(frames, device))
                encode_audio(built.audio_vae, mel)

        round_times = {"decode": timed(decode), "encode": timed(encode)}
        for t in threads:
            cfg = resolve({"output_dir": str(work / "run"), "model": {"target": "tiny-ltx-2.3"},
                           "data": {"cache_dir": str(work / f"cache{repeat}-{t}"), "source": str(work / "clips"),
                                    "buckets": [bucket], "decode_threads": t}})
            reports = []
            round_times[f"preprocess/{t}"] = timed(lambda: reports.append(preprocess(cfg, progress=False,
                                                                                     components=built)))
            assert reports[0].encoded == args.clips, reports[0].summary()
        if repeat:
            for name, seconds in round_times.items():
                times[name].append(seconds)
    shutil.rmtree(work)

    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"card: {card}, torch {torch.__version__}, VAEs {args.vaes}, {args.clips} clips of "
          f"{source_width}x{source_height} into {bucket} at 24 fps, {torch.get_num_threads()} CPU threads")
    print("what          median s   clips/s   video s/s   (runs)")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"{name:<13} {median:8.2f} {args.clips / median:9.2f} {seconds_of_video / median:11.2f}   "
              f"({', '.join('%.2f' % r for r in runs)})")


if __name__ == "__main__":
    main()
