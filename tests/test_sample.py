"""Validation samples and `ltx-lora sample` on tiny models: MP4 files that read back, determinism, the token-count
shift, conditions, the training hook with TensorBoard, and refusal of bad input before anything renders."""

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import av
import decord
import numpy as np
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler
from media_files import gray_frames, write_video
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.cli import main
from trainer.config import ConfigError, resolve
from trainer.lora import get_lora_state_dict, inject_lora
from trainer.lora_files import read_lora, save_lora
from trainer.models import loading
from trainer.models.registry import build_random_transformer, get_target
from trainer.sample import PUBLISHED_SCHEDULER, Renderer, _adapter_state, scheduler_config, write_sample

SMOKE = Path(__file__).parent.parent / "configs" / "smoke.yaml"
CPU = torch.device("cpu")
SMALL = {"width": 64, "height": 64, "frames": 9, "num_inference_steps": 2}


def _raw(tmp_path, target="tiny-ltx-2.3", mode="text-to-audio-video", data=None, **validation):
    return {
        "output_dir": str(tmp_path / "run"),
        "model": {"target": target},
        "mode": mode,
        "data": {"cache_dir": str(tmp_path / "cache"), **(data or {})},
        "validation": {"prompts": ["a red square slides to the right"], **SMALL, **validation},
    }


def _renderer(tmp_path, **kwargs):
    cfg = resolve(_raw(tmp_path, **kwargs))
    return Renderer(cfg, cfg.validation, CPU), build_random_transformer(get_target(cfg.model.target), seed=0).eval()


def _image(path, value):
    Image.fromarray(np.full((80, 100, 3), value, np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("target, mode, rate", [
    ("tiny-ltx-2.3", "text-to-audio-video", 48000),  # LTX-2.3's vocoder ends with bandwidth extension to 48 kHz
    ("tiny-ltx-2", "audio-only", 24000),
    ("tiny-ltx-2", "text-to-video", None),
])
def test_a_sample_is_an_mp4_with_its_frames_size_and_sound(tmp_path, target, mode, rate):
    renderer, model = _renderer(tmp_path, target=target, mode=mode, width=96, height=64)
    path = write_sample(tmp_path / "sample.mp4", renderer.render(model, 0))

    reader = decord.VideoReader(str(path))
    assert len(reader) == 9 and reader[0].shape == (64, 96, 3)
    with av.open(str(path)) as container:
        video = container.streams.video[0].codec_context
        assert (video.name, video.pix_fmt) == ("h264", "yuv420p")
        if rate is None:
            assert not container.streams.audio
            return
        audio = container.streams.audio[0]
        assert (audio.codec_context.name, audio.rate, audio.channels) == ("aac", rate, 2)
        expected = 9 / 24 * rate  # the video's duration, in samples
        assert abs(float(audio.duration * audio.time_base) * rate - expected) <= 1024  # one AAC frame
        assert abs(sum(frame.samples for frame in container.decode(audio=0)) - expected) <= 1024


def test_a_prompt_renders_the_same_every_time_and_the_seed_changes_it(tmp_path):
    renderer, model = _renderer(tmp_path, seed=3)
    first = renderer.render(model, 0)
    torch.manual_seed(1234)  # the noise comes from validation.seed alone, not from the global random state
    second = renderer.render(model, 0)
    assert np.array_equal(first.frames, second.frames) and np.array_equal(first.audio, second.audio)
    other, _ = _renderer(tmp_path, seed=4)
    assert not np.array_equal(other.render(model, 0).frames, first.frames)


def test_the_scheduler_shift_follows_the_video_token_count(tmp_path, monkeypatch):
    calls = []
    real = FlowMatchEulerDiscreteScheduler.set_timesteps

    @functools.wraps(real)  # the pipelines inspect its signature
    def recording(self, *args, **kwargs):
        real(self, *args, **kwargs)
        calls.append((kwargs["mu"], self.sigmas.clone()))

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "set_timesteps", recording)
    schedules = {}
    for width, height, frames in ((64, 64, 9), (128, 96, 17)):
        renderer, model = _renderer(tmp_path, width=width, height=height, frames=frames, num_inference_steps=4)
        renderer.render(model, 0)
        tokens = ((frames - 1) // 8 + 1) * (height // 32) * (width // 32)
        mu, sigmas = calls[-1]
        # The published line: shift 0.95 at 1024 tokens, 2.05 at 4096, extrapolated.
        assert mu == pytest.approx(0.95 + (tokens - 1024) * (2.05 - 0.95) / (4096 - 1024))
        assert sigmas[-2] == pytest.approx(0.1)  # stretched to end at the published terminal sigma
        schedules[tokens] = sigmas
    small, large = schedules.values()
    assert not torch.allclose(small, large) and (large[1:-1] > small[1:-1]).all()  # more tokens, more noise kept


def test_the_scheduler_takes_what_the_checkpoint_declares_in_diffusers_terms(tmp_path, monkeypatch):
    assert scheduler_config(None) == PUBLISHED_SCHEDULER
    folder = tmp_path / "ltx" / "scheduler"
    folder.mkdir(parents=True)
    (folder / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "max_shift": 2.5, "shift_terminal": None, "shifting": "SD3"}
    ))
    assert scheduler_config(str(tmp_path / "ltx")) == {**PUBLISHED_SCHEDULER, "max_shift": 2.5, "shift_terminal": None}

    # A single file's `scheduler` metadata section: RectifiedFlowScheduler keys are not diffusers' and are left out.
    section = {"_class_name": "RectifiedFlowScheduler", "num_train_timesteps": 1000, "shifting": "SD3",
               "target_shift_terminal": None, "base_shift": 0.5}
    monkeypatch.setattr(loading, "detect_checkpoint", lambda path: SimpleNamespace(source_config={"scheduler": section}))
    assert scheduler_config(str(tmp_path / "ltx.safetensors")) == {**PUBLISHED_SCHEDULER, "num_train_timesteps": 1000,
                                                                   "base_shift": 0.5}


@pytest.mark.parametrize("mode, key", [("image-to-video", "image"), ("ic-lora", "reference")])
def test_the_conditioning_file_shapes_the_sample(tmp_path, mode, key):
    if key == "image":
        dark, bright = _image(tmp_path / "dark.png", 10), _image(tmp_path / "bright.png", 240)
    else:
        dark = str(write_video(tmp_path / "dark.mp4", gray_frames([10] * 12, width=64, height=64)))
        bright = str(write_video(tmp_path / "bright.mp4", gray_frames([240] * 12, width=64, height=64)))
    prompts = [{"prompt": "a square", key: dark}, {"prompt": "a square", key: bright}]
    renderer, model = _renderer(tmp_path, mode=mode, prompts=prompts, data={"reference_downscale": 2})
    first, second = renderer.render(model, 0), renderer.render(model, 1)
    assert first.frames.shape == (9, 64, 64, 3) and first.audio is None  # video-only modes write no sound
    assert np.abs(first.frames.astype(int) - second.frames.astype(int)).mean() > 1


def test_training_with_validation_writes_samples_and_tensorboard_summaries(tmp_path):
    run = tmp_path / "run"
    overrides = [
        f"output_dir={run}", "data.source=null", "data.demo=false", f"data.cache_dir={tmp_path / 'cache'}",
        "data.synthetic={num_samples: 2, frames: 9, height: 64, width: 64}", "mode=text-to-audio-video",
        "train.steps=4", "train.batch_size=1", "validation.every=2", *(f"validation.{k}={v}" for k, v in SMALL.items()),
    ]
    assert main(["train", str(SMOKE), *[arg for item in overrides for arg in ("--set", item)]]) == 0

    names = [f"{i:02d}_{'-'.join(p.split()[:6])}" for i, p in enumerate(yaml.safe_load(SMOKE.read_text())
                                                                        ["validation"]["prompts"])]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002", "step_000004"]
    for step in ("step_000002", "step_000004"):
        assert sorted(p.stem for p in (run / "samples" / step).iterdir()) == names
        assert len(decord.VideoReader(str(run / "samples" / step / f"{names[0]}.mp4"))) == 9
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "audio": 0})
    events.Reload()
    for name in names:
        images, sounds = events.Images(f"samples/{name}"), events.Audio(f"samples/{name}")
        assert [e.step for e in images] == [2, 4] and all(e.encoded_image_string[:6] == b"GIF89a" for e in images)
        assert [e.step for e in sounds] == [2, 4] and sounds[0].sample_rate == 48000


def _lora_file(path, target="tiny-ltx-2.3", metadata=None):
    """A LoRA of the tiny model whose lora_B is not zero, so it changes the output."""
    model = build_random_transformer(get_target(target), seed=0)
    inject_lora(model, 4, 4.0, 0.0, "video")
    state = {k: v if "lora_A" in k else torch.randn_like(v) for k, v in get_lora_state_dict(model).items()}
    if metadata is None:
        metadata = {"model_target": target, "model_version": get_target(target).version}
    save_lora(path, state, rank=4, alpha=4.0, fmt="comfyui", metadata=metadata)
    return str(path)


def _sample_config(tmp_path, target="tiny-ltx-2.3"):
    path = tmp_path / f"{target}.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path, target=target)))
    return str(path)


def test_sample_command_writes_base_lora_and_side_by_side(tmp_path, capsys):
    lora = _lora_file(tmp_path / "mine.safetensors")
    out = tmp_path / "out"
    assert main(["sample", _sample_config(tmp_path), "--lora", lora, "--prompt", "a blue ball", "--out", str(out),
                 "--steps", "2", "--seed", "5"]) == 0
    files = {p.name for p in out.iterdir()}
    assert files == {"00_a-blue-ball_base.mp4", "00_a-blue-ball_lora.mp4", "00_a-blue-ball_compare.mp4"}
    assert "00_a-blue-ball_compare.mp4" in capsys.readouterr().out
    base, with_lora, compare = (decord.VideoReader(str(out / f"00_a-blue-ball_{s}.mp4")) for s in
                                ("base", "lora", "compare"))
    assert len(base) == len(with_lora) == len(compare) == 9 and compare[0].shape == (64, 128, 3)
    difference = np.abs(base.get_batch(range(9)).asnumpy().astype(int) - with_lora.get_batch(range(9)).asnumpy())
    assert difference.mean() > 1  # the adapter is on in one and off in the other
    with av.open(str(out / "00_a-blue-ball_compare.mp4")) as container:
        assert container.streams.audio[0].codec_context.name == "aac"


def test_sample_command_refuses_a_lora_that_is_not_for_the_configs_model(tmp_path, capsys):
    other = _lora_file(tmp_path / "for-ltx-2.3.safetensors")
    assert main(["sample", _sample_config(tmp_path, "tiny-ltx-2"), "--lora", other]) == 2
    error = capsys.readouterr().err
    assert "is a LoRA for tiny-ltx-2.3 (LTX 2.3)" in error and "model.target is 'tiny-ltx-2' (LTX 2.0)" in error

    misfit = tmp_path / "misfit.safetensors"
    save_lora(misfit, {"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 7),
                       "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 4)},
              rank=4, alpha=4.0, fmt="comfyui", metadata={})
    assert main(["sample", _sample_config(tmp_path), "--lora", str(misfit)]) == 2
    assert ("was made for an unknown model (no model_target in its metadata) and does not fit the config's "
            "model.target 'tiny-ltx-2.3'") in capsys.readouterr().err

    assert main(["sample", _sample_config(tmp_path), "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run" / "samples").exists()


def test_lower_rank_modules_are_padded_without_changing_their_delta(tmp_path):
    path = tmp_path / "mixed.safetensors"
    a2, b2, a4, b4 = torch.randn(2, 32), torch.randn(32, 2), torch.randn(4, 32), torch.randn(32, 4)
    save_lora(path, {"m.lora_A.weight": a2, "m.lora_B.weight": b2}, rank=2, alpha=2.0, fmt="comfyui", metadata={})
    lora = read_lora(path)
    lora.modules["n"] = (a4, b4)
    state = _adapter_state(lora, 4)
    assert state["m.lora_A.weight"].shape == (4, 32) and state["m.lora_B.weight"].shape == (32, 4)
    assert torch.allclose(state["m.lora_B.weight"] @ state["m.lora_A.weight"], b2 @ a2)


@pytest.mark.parametrize("mode, key, path, expected", [
    ("image-to-video", "image", "missing.png",
     r"validation\.prompts\.0\.image = '.*missing\.png': no such file; accepted: an existing image file \(\.png"),
    ("ic-lora", "reference", "missing.mp4",
     r"validation\.prompts\.0\.reference = '.*missing\.mp4': no such file; accepted: an existing video file \(\.mp4"),
    ("text-to-video", "image", "first.png", r"prompts\.0\.image = .*: mode 'text-to-video' takes no first-frame image"),
    ("image-to-video", "reference", "ref.mp4", r"prompts\.0\.reference = .*: only mode 'ic-lora' takes a reference"),
])
def test_a_condition_that_is_missing_or_does_not_fit_the_mode_is_a_config_error(tmp_path, mode, key, path, expected):
    _image(tmp_path / "first.png", 100)
    write_video(tmp_path / "ref.mp4", gray_frames([100] * 9))
    prompts = [{"prompt": "a square", key: str(tmp_path / path)}]
    with pytest.raises(ConfigError, match=expected):
        resolve(_raw(tmp_path, mode=mode, prompts=prompts))

    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(_raw(tmp_path, mode=mode, prompts=prompts)))
    assert main(["train", str(config)]) == 2
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


def test_a_reference_too_short_for_the_sample_is_refused_before_rendering(tmp_path):
    short = write_video(tmp_path / "short.mp4", gray_frames([100] * 4))
    cfg = resolve(_raw(tmp_path, mode="ic-lora", prompts=[{"prompt": "a square", "reference": str(short)}]))
    with pytest.raises(ConfigError, match=r"validation\.prompts\.0\.reference = '.*short\.mp4': .*too short"):
        Renderer(cfg, cfg.validation, CPU)
