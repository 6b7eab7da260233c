"""A preprocessing process killed with SIGKILL mid-run leaves a cache the next run completes and validates."""

import os
import signal
import subprocess
import sys
import time

import yaml

from trainer.data.cache import LatentCache
from trainer.data.demo import write_demo_dataset
from trainer.models.registry import TARGETS


def test_sigkill_mid_run_then_rerun_gives_a_complete_valid_cache(tmp_path):
    source = tmp_path / "demo"
    write_demo_dataset(source, num_clips=12, num_images=0)
    cache = tmp_path / "cache"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"), "model": {"target": "tiny-ltx-2.3"},
        "data": {"cache_dir": str(cache), "source": str(source), "buckets": ["192x128x25"]},
    }))
    command = [sys.executable, "-m", "trainer.cli", "preprocess", str(config)]

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(cache.glob("*.safetensors")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (cache / "manifest.json").exists(), "the run finished before it could be killed"
    # Whatever was written under a final name is whole: safetensors refuses truncated files.
    done = sorted(cache.glob("*.safetensors"))
    assert 1 <= len(done) < 12

    subprocess.run(command, check=True, capture_output=True)
    target = TARGETS["tiny-ltx-2.3"]
    dataset = LatentCache(cache, target.version, target.video_text_dim, target.audio_text_dim, require_audio=True)
    assert len(dataset) == 12
    assert all(dataset[i]["video_latents"].shape == (128, 4, 4, 6) for i in range(len(dataset)))
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]  # the killed run's temporary file is gone
