"""Rendering samples with the diffusers LTX-2 pipelines: validation rounds while training and `ltx-lora sample`.

The pipelines are assembled from modules we already hold: the (PEFT-wrapped) transformer, the video VAE, audio VAE,
vocoder and text connectors, and a `FlowMatchEulerDiscreteScheduler` configured as the published LTX-2 scheduler, with
dynamic shifting, so each pipeline derives the shift from the video token count (`calculate_shift`), not a fixed one.
Gemma runs once, at the start: the prompts' packed hidden states stay on the CPU and go to the pipelines as
`prompt_embeds` (the pipelines run the connectors themselves), and the text encoder is freed before training.

Which pipeline renders a prompt: `LTX2InContextPipeline` when the mode is ic-lora and the prompt has a `reference`
video, `LTX2ImageToVideoPipeline` when it has an `image`, else `LTX2Pipeline`. The pipelines always generate video and
audio jointly; none of them takes a clean audio (or clean video) condition, so audio-to-video and video-to-audio LoRAs
are sampled by joint generation too (docs/validation.md). Audio goes into the file when the mode has audio.
"""

from __future__ import annotations

import gc
import inspect
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import FlowMatchEulerDiscreteScheduler, LTX2ImageToVideoPipeline, LTX2Pipeline
from diffusers.pipelines.ltx2 import LTX2InContextPipeline
from diffusers.pipelines.ltx2.pipeline_ltx2_condition import LTX2VideoCondition
from diffusers.pipelines.ltx2.pipeline_ltx2_ic_lora import LTX2ReferenceCondition
from diffusers.pipelines.ltx2.utils import DEFAULT_NEGATIVE_PROMPT
from PIL import Image

from trainer.config import ConfigError, RunConfig, ValidationPrompt, ValidationSection
from trainer.lora_files import LoraFile, LoraFileError, read_lora
from trainer.models.registry import (
    ModelTarget,
    build_random_transformer,
    build_transformer,
    check_checkpoint,
    get_target,
)
from trainer.modes import MODE_SPECS
from trainer.performance import eager_blocks
from trainer.video_files import gif_bytes, write_mp4

logger = logging.getLogger("ltx_lora")

# The scheduler of the published diffusers LTX-2 / LTX-2.3 pipelines (non-distilled): the shift grows linearly with
# the video token count from 0.95 at 1024 tokens to 2.05 at 4096 (as ltx-core's LTX2Scheduler), and the schedule is
# stretched to end at sigma 0.1.
PUBLISHED_SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                           max_image_seq_len=4096, shift_terminal=0.1)
# Spatio-temporal guidance perturbs this block, as diffusers recommends per version (smaller models: their last).
STG_BLOCK = {"2.3": 28, "2.0": 29}


def scheduler_config(checkpoint: str | None) -> dict:
    """The published scheduler settings, overridden by the checkpoint's own where it declares them in diffusers'
    terms (a diffusers folder's scheduler_config.json, or a single file's `scheduler` metadata section). Keys of the
    older RectifiedFlowScheduler vocabulary that single files carry (`shifting`, `sampler`, ...) are not read, as
    ltx-core does not read them either."""
    config = dict(PUBLISHED_SCHEDULER)
    if checkpoint is None:
        return config
    path = Path(checkpoint)
    if path.is_dir():
        file = path / "scheduler" / "scheduler_config.json"
        declared = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    else:
        from trainer.models.loading import detect_checkpoint

        declared = detect_checkpoint(path).source_config.get("scheduler") or {}
    accepted = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    config.update({key: value for key, value in declared.items() if key in accepted})
    return config


@dataclass
class Sample:
    """One rendered video: frames [F, H, W, 3] uint8 and, when the mode has sound, audio [2, samples] float."""

    frames: np.ndarray
    fps: float
    audio: np.ndarray | None
    sample_rate: int


@dataclass
class _Parts:
    """What the pipelines need besides the transformer and the scheduler."""

    video_vae: torch.nn.Module
    audio_vae: torch.nn.Module
    vocoder: torch.nn.Module
    connectors: torch.nn.Module

    def to(self, device: torch.device | str) -> None:
        for module in (self.video_vae, self.audio_vae, self.vocoder, self.connectors):
            module.to(device)


def _load_parts(cfg: RunConfig, device: torch.device, prompts: list[str]) -> tuple[_Parts, list[tuple]]:
    """The decoding parts on `device` and each prompt's (packed Gemma features, token mask) on the CPU. Gemma is
    loaded only for this and freed before returning."""
    from trainer.models.components import load_components

    target = get_target(cfg.model.target)
    components = load_components(cfg, device)
    if cfg.model.checkpoint is None:
        from trainer.models.tiny import tiny_vocoder

        vocoder = tiny_vocoder(target, seed=cfg.model.init_seed).to(device)
    else:
        from trainer.models.loading import load_vocoder

        vocoder = load_vocoder(cfg.model.components or cfg.model.checkpoint, device, torch.float32)
    encoder = components.prompt_encoder
    features = []
    for prompt in prompts:
        embeds, mask = encoder.features([prompt])
        features.append((embeds.cpu(), mask))
    parts = _Parts(components.video_vae, components.audio_vae, vocoder, encoder.connectors)
    del components, encoder
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return parts, features


def _conditions(cfg: RunConfig, settings: ValidationSection) -> list[dict]:
    """Each prompt's first-frame image and reference frames, decoded once, at the sample's size (the reference at
    1/`data.reference_downscale` of it); a file that cannot be used is a ConfigError before anything renders."""
    from trainer.data.media import Bucket, decode_frames, probe

    loaded = []
    for index, item in enumerate(settings.prompts):
        conditions = {}
        for key, path, size in (
            ("image", item.image, (settings.width, settings.height, 1)),
            ("reference", item.reference, (settings.width // cfg.data.reference_downscale,
                                           settings.height // cfg.data.reference_downscale, settings.frames)),
        ):
            if path is None:
                continue
            try:
                frames = decode_frames(probe(path), Bucket(*size), settings.fps).numpy()
                conditions[key] = [Image.fromarray(frame) for frame in frames]
            except ValueError as exc:  # a MediaError ("<path>: <reason>"), or a size that is no bucket
                reason = str(exc).removeprefix(f"{Path(path)}: ")
                raise ConfigError(f"validation.prompts.{index}.{key} = {path!r}: {reason}") from None
        loaded.append(conditions)
    return loaded


class Renderer:
    """Renders the prompts of a validation section with any transformer of the config's target."""

    def __init__(self, cfg: RunConfig, settings: ValidationSection, device: torch.device):
        self.cfg, self.settings, self.device = cfg, settings, device
        self.target = get_target(cfg.model.target)
        self.audio = MODE_SPECS[cfg.mode].audio != "absent"
        self.scheduler = scheduler_config(cfg.model.checkpoint)
        self.conditions = _conditions(cfg, settings)
        negative = settings.negative_prompt if settings.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
        texts = [item.prompt for item in settings.prompts]
        self.parts, features = _load_parts(cfg, device, [negative, *texts])
        self.negative, self.features = features[0], features[1:]

    def names(self) -> list[str]:
        """`<index>_<slug>` of each prompt, for file names and TensorBoard tags."""
        return [f"{index:02d}_{_slug(item.prompt)}" for index, item in enumerate(self.settings.prompts)]

    @torch.no_grad()
    def render(self, transformer: torch.nn.Module, index: int) -> Sample:
        """Prompt `index` with a generator seeded from `settings.seed`: the same noise every time it is called."""
        s, conditions = self.settings, self.conditions[index]
        (embeds, mask), (negative, negative_mask) = self.features[index], self.negative
        parts = dict(vae=self.parts.video_vae, audio_vae=self.parts.audio_vae, vocoder=self.parts.vocoder,
                     connectors=self.parts.connectors, transformer=transformer, text_encoder=None, tokenizer=None,
                     scheduler=FlowMatchEulerDiscreteScheduler(**self.scheduler))
        # The LTX-2 transformer in diffusers has no perturbed attention: STG would be a second identical pass.
        stg = s.stg_scale if transformer.config.perturbed_attn else 0.0
        kwargs = dict(
            prompt_embeds=embeds.to(self.device), prompt_attention_mask=mask.to(self.device),
            negative_prompt_embeds=negative.to(self.device),
            negative_prompt_attention_mask=negative_mask.to(self.device),
            width=s.width, height=s.height, num_frames=s.frames, frame_rate=s.fps,
            num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
            audio_guidance_scale=s.audio_guidance_scale, stg_scale=stg, audio_stg_scale=stg,
            modality_scale=s.modality_scale, audio_modality_scale=s.modality_scale,
            spatio_temporal_guidance_blocks=[min(STG_BLOCK[self.target.version], transformer.config.num_layers - 1)],
            generator=torch.Generator().manual_seed(s.seed), output_type="np", return_dict=False,
        )
        if "reference" in conditions:
            pipeline = LTX2InContextPipeline(**parts)
            kwargs.update(reference_conditions=[LTX2ReferenceCondition(frames=conditions["reference"])],
                          reference_downscale_factor=self.cfg.data.reference_downscale)
            if "image" in conditions:
                kwargs["conditions"] = [LTX2VideoCondition(frames=conditions["image"][0], index=0)]
        elif "image" in conditions:
            pipeline = LTX2ImageToVideoPipeline(**parts)
            kwargs["image"] = conditions["image"][0]
        else:
            pipeline = LTX2Pipeline(**parts)
        pipeline.set_progress_bar_config(disable=True)
        video, audio = pipeline(**kwargs)

        frames = (video[0] * 255).round().clip(0, 255).astype(np.uint8)
        rate = self.parts.vocoder.config.output_sampling_rate
        if not self.audio:
            return Sample(frames, s.fps, None, rate)
        # The vocoder's output falls a few milliseconds short of the video: cut or pad to the video's duration.
        waveform = audio[0].float().cpu().numpy()
        length = round(s.frames / s.fps * rate)
        waveform = np.pad(waveform[:, :length], ((0, 0), (0, max(0, length - waveform.shape[1]))))
        return Sample(frames, s.fps, waveform, rate)


def _slug(text: str, words: int = 6) -> str:
    return "-".join(re.findall(r"[a-z0-9]+", text.lower())[:words])[:48] or "prompt"


def write_sample(path: Path, sample: Sample) -> Path:
    """The sample as an MP4 at `path` (folders created, written atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(path, sample.frames, sample.fps, sample.audio, sample.sample_rate)
    return path


class Validator:
    """Validation rounds during training: every `validation.every` steps and at the end, rendered on the main process
    with the LoRA as it is, written to `<output_dir>/samples/step_<NNNNNN>/` and logged to TensorBoard.

    Create it before the transformer is built: Gemma (which encodes the prompts once) is then freed before the
    transformer takes its memory. Between rounds the decoding parts wait on the CPU."""

    def __init__(self, cfg: RunConfig, accelerator: Accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        self.renderer = None
        if cfg.validation.prompts and accelerator.is_main_process:
            self.renderer = Renderer(cfg, cfg.validation, accelerator.device)
            self.renderer.parts.to("cpu")

    def due(self, step: int) -> bool:
        every = self.cfg.validation.every
        return bool(self.cfg.validation.prompts) and (step == self.cfg.train.steps or bool(every and step % every == 0))

    def after_step(self, step: int, model: torch.nn.Module) -> list[Path]:
        """Renders a round when one is due at `step`; every process waits until it is done."""
        if not self.due(step):
            return []
        written = []
        if self.renderer is not None:
            transformer = self.accelerator.unwrap_model(model)
            training = transformer.training
            transformer.eval()
            self.renderer.parts.to(self.accelerator.device)
            # The training's random state stays as it was, so a resumed run still repeats an uninterrupted one.
            devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
            try:
                with torch.random.fork_rng(devices=devices), eager_blocks(transformer):
                    written = self._round(transformer, step)
            finally:
                self.renderer.parts.to("cpu")
                transformer.train(training)
        self.accelerator.wait_for_everyone()
        return written

    def _round(self, transformer: torch.nn.Module, step: int) -> list[Path]:
        folder = Path(self.cfg.output_dir) / "samples" / f"step_{step:06d}"
        writer = next((t.tracker for t in self.accelerator.trackers if t.name == "tensorboard"), None)
        written = []
        for index, name in enumerate(self.renderer.names()):
            sample = self.renderer.render(transformer, index)
            written.append(write_sample(folder / f"{name}.mp4", sample))
            if writer is not None:
                _log_sample(writer, f"samples/{name}", sample, step)
        if writer is not None:
            writer.flush()
        logger.info("step %d: %d validation samples in %s", step, len(written), folder)
        return written


def _log_sample(writer, tag: str, sample: Sample, step: int) -> None:
    """The video as an animated GIF image summary (torch's add_video would need moviepy), the sound as audio."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    gif = gif_bytes(sample.frames, sample.fps)
    with Image.open(io.BytesIO(gif)) as preview:
        width, height = preview.size
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    if sample.audio is not None:
        writer.add_audio(tag, torch.from_numpy(sample.audio.mean(axis=0)), step, sample_rate=sample.sample_rate)


# --- `ltx-lora sample`: a finished LoRA beside the base model ---------------------------------------------------


def check_lora_target(lora: LoraFile, target: ModelTarget) -> None:
    """A LoRA whose metadata names another model is refused, naming both (LoRAs do not transfer between them)."""
    made_for, version = lora.metadata.get("model_target"), lora.metadata.get("model_version")
    if made_for is None and version is not None and version != target.version:
        made_for = f"LTX-{version}"
    elif made_for is None or made_for == target.name:
        return
    raise LoraFileError(
        f"{lora.path} is a LoRA for {made_for} (LTX {version or 'version unknown'}), but the config's model.target is "
        f"{target.name!r} (LTX {target.version}); a LoRA works only on the model it was trained on: sample it with a "
        f"config for {made_for}"
    )


def check_lora_fits(lora: LoraFile, target: ModelTarget) -> None:
    """Every adapted module must be a Linear layer of the target with the LoRA's shape; checked on a model on the
    meta device, so nothing is allocated before the file is known to fit."""
    layers = dict(build_random_transformer(target, seed=0, device="meta").named_modules())
    problems = []
    for module, (a, b) in lora.modules.items():
        layer = layers.get(module)
        if not isinstance(layer, torch.nn.Linear):
            problems.append(f"{module} (no such Linear layer)")
        elif layer.weight.shape != (b.shape[0], a.shape[1]):
            problems.append(f"{module} (layer {tuple(layer.weight.shape)}, LoRA {(b.shape[0], a.shape[1])})")
    if problems:
        made_for = lora.metadata.get("model_target", "an unknown model (no model_target in its metadata)")
        raise LoraFileError(f"{lora.path} was made for {made_for} and does not fit the config's model.target "
                            f"{target.name!r}: {len(problems)} of {len(lora.modules)} modules, e.g. {problems[:3]}")


def _adapter_state(lora: LoraFile, rank: int) -> dict[str, torch.Tensor]:
    """PEFT-layout tensors at one rank: a lower-rank module is padded with zero rows of A and columns of B, which
    leaves B @ A, and so the delta, exactly as it was."""
    state = {}
    for module, (a, b) in lora.modules.items():
        pad = rank - a.shape[0]
        state[f"{module}.lora_A.weight"] = torch.nn.functional.pad(a, (0, 0, 0, pad))
        state[f"{module}.lora_B.weight"] = torch.nn.functional.pad(b, (0, pad))
    return state


def sample_lora(cfg: RunConfig, lora_path: Path, prompts: list[str], out_dir: Path | None = None,
                steps: int | None = None, seed: int | None = None) -> list[Path]:
    """Renders each prompt (the given ones, else the config's validation prompts) with the base model and with the
    LoRA, same seed: `<name>_base.mp4`, `<name>_lora.mp4` and `<name>_compare.mp4` (side by side, LoRA's sound)."""
    from trainer.lora import inject_lora, set_lora_state_dict

    target = get_target(cfg.model.target)
    lora = read_lora(lora_path)
    check_lora_target(lora, target)
    if cfg.model.checkpoint is not None:
        check_checkpoint(target, cfg.model.checkpoint)
    check_lora_fits(lora, target)
    update = {"num_inference_steps": steps, "seed": seed}
    settings = cfg.validation.model_copy(update={k: v for k, v in update.items() if v is not None})
    if any(not p.strip() for p in prompts):
        raise ConfigError("--prompt: an empty prompt; give the text to render")
    if prompts:
        settings = settings.model_copy(update={"prompts": [ValidationPrompt(prompt=p) for p in prompts]})
    if not settings.prompts:
        raise ConfigError("no prompts to render: give --prompt TEXT, or set validation.prompts in the config")
    out_dir = out_dir or Path(cfg.output_dir) / "samples" / lora.path.stem

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    renderer = Renderer(cfg, settings, device)  # before the transformer: Gemma is gone when it loads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_transformer(target, cfg.model.checkpoint, cfg.model.init_seed, dtype, device).eval()
    rank = max(a.shape[0] for a, _ in lora.modules.values())
    inject_lora(model, rank, float(rank), 0.0, sorted(lora.modules))  # the file's scale is already in lora_B
    set_lora_state_dict(model, _adapter_state(lora, rank))
    model.to(dtype)  # the adapter too: the pipelines run without autocast, and rendering needs no fp32 weights

    written = []
    for index, name in enumerate(renderer.names()):
        model.disable_adapters()
        base = renderer.render(model, index)
        model.enable_adapters()
        with_lora = renderer.render(model, index)
        side_by_side = Sample(np.concatenate([base.frames, with_lora.frames], axis=2), with_lora.fps,
                              with_lora.audio, with_lora.sample_rate)
        for suffix, sample in (("base", base), ("lora", with_lora), ("compare", side_by_side)):
            written.append(write_sample(out_dir / f"{name}_{suffix}.mp4", sample))
    return written
