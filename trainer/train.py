"""The training loop: Accelerate, LoRA on the frozen transformer, checkpoints and resume, logging, export.

Reproducibility is by construction: the noise and sigmas of step s come from a generator seeded with (seed, s), and
the data order is a pure function of the seed (see data/batches.py), so a resumed run repeats exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer.checkpoint import (
    CheckpointError,
    check_identity,
    full_optimizer_state,
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    restore_rng,
    save_checkpoint,
)
from trainer.config import AUDIO_MODES, ConfigError, RunConfig
from trainer.data.batches import BatchPlan, collate
from trainer.data.cache import LatentCache, audio_steps
from trainer.data.preprocess import preprocess
from trainer.data.synthetic import ensure_synthetic_cache
from trainer.lora import (
    PRESET_GROUPS,
    get_lora_state_dict,
    group_of,
    inject_lora,
    lora_parameters,
    set_lora_state_dict,
)
from trainer.export import export_run
from trainer.fp8 import check_fp8_device, use_fp8_base_linears
from trainer.memory_plan import (
    PROBE_BLOCKS,
    MemoryPlan,
    measure_block_memory,
    memory_budget,
    optimizer_state_bytes,
    plan_blocks,
)
from trainer.models.registry import ModelTarget, build_transformer, check_checkpoint, get_target
from trainer.modes import MODE_SPECS, build_step_inputs, compute_loss, isolated_groups
from trainer.performance import checkpoint_blocks, compile_blocks, recompute_feedforward
from trainer.sample import Validator

logger = logging.getLogger("ltx_lora")


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainResult:
    output_dir: Path
    final_step: int
    exported: list[Path]
    losses: list[float]


def run_identity(cfg: RunConfig) -> dict[str, Any]:
    """What must match between a checkpoint and the config that resumes it."""
    return {
        "model_target": cfg.model.target,
        "rank": cfg.lora.rank,
        "alpha": cfg.lora_alpha,
        "targets": cfg.lora_targets,
    }


def check_output_dir(output_dir: Path) -> None:
    """Fails early, with the path, when the run directory cannot be created or written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"output_dir = {str(output_dir)!r} cannot be written: {exc.strerror or exc}") from None


def _block_count(setting: bool | int, blocks: int) -> int:
    """A train.* setting that takes true (every block), false (none) or a number of blocks, as a number."""
    return blocks if setting is True else int(setting)


def plans_memory(cfg: RunConfig, device: torch.device) -> bool:
    """Whether `train.gradient_checkpointing: auto` measures and plans: on a GPU (on the CPU nothing is checkpointed:
    host memory is not planned for)."""
    return cfg.train.gradient_checkpointing == "auto" and device.type == "cuda"


def plan_memory(cfg: RunConfig, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                dataset: LatentCache, fsdp: bool) -> MemoryPlan:
    """`train.gradient_checkpointing: auto` on a GPU: measures the memory of two probe steps on the largest sample
    (trainer/memory_plan.py) and plans the blocks; every process gets the same plan (the largest measurement), as
    FSDP needs. The probes leave no gradients and draw no random numbers of the run (they come before seeding)."""
    device = accelerator.device
    spec = MODE_SPECS[cfg.mode]
    tokens = [dataset.tokens(i, video=spec.video != "absent", audio=spec.audio != "absent", reference=spec.reference)
              for i in range(len(dataset))]
    largest = max(range(len(dataset)), key=tokens.__getitem__)
    batch = collate([dataset[largest]] * cfg.train.batch_size)

    def probe_step() -> None:
        inputs = build_step_inputs(batch_to_device(batch, device), cfg.mode, torch.Generator().manual_seed(0),
                                   cfg.conditioning.first_frame_p)
        try:
            with accelerator.no_sync(model):
                with accelerator.autocast() if fsdp else nullcontext():
                    loss, _ = compute_loss(model, inputs)
                accelerator.backward(loss)
        finally:
            optimizer.zero_grad(set_to_none=True)

    transformer = accelerator.unwrap_model(model)
    blocks = len(transformer.transformer_blocks)
    logger.info("memory plan: two probe steps on the largest sample (%d tokens; the first compiles the blocks)",
                tokens[largest])
    base, per_block = measure_block_memory(transformer, probe_step, device)
    base += optimizer_state_bytes(transformer)
    measured = accelerator.gather(torch.tensor([[base, -1 if per_block is None else per_block]], device=device))
    base, per_block = int(measured[:, 0].max()), int(measured[:, 1].max())
    if (measured[:, 1] < 0).any():
        per_block = None
        logger.warning("memory plan: keeping %d blocks ran out of GPU memory; every block stays checkpointed",
                       min(blocks, PROBE_BLOCKS))
    else:
        logger.info("memory plan: every block checkpointed %.1f GiB, each kept block %.2f GiB more", base / 2**30,
                    per_block / 2**30)
    total = torch.cuda.get_device_properties(device).total_memory
    budget = memory_budget(device, cfg.train.memory_limit_gib)
    plan = plan_blocks(blocks, base, per_block, budget, can_offload=accelerator.num_processes == 1,
                       host_available=psutil.virtual_memory().available)
    logger.info("memory plan (budget %.1f of %.1f GiB): %s", budget / 2**30, total / 2**30, plan.describe())
    if plan.predicted_peak > budget:
        logger.warning("memory plan: even with every block checkpointed the step needs about %.1f GiB, more than "
                       "the budget of %.1f GiB (train.memory_limit_gib)", plan.predicted_peak / 2**30, budget / 2**30)
    return plan


def check_fsdp(cfg: RunConfig, accelerator: Accelerator) -> None:
    """What a run sharded with FSDP (`accelerate launch --config_file configs/accelerate/fsdp.yaml`) cannot do is
    refused before the model is built, naming the key to change."""
    plugin = accelerator.state.fsdp_plugin
    version = getattr(plugin, "fsdp_version", 1)  # accelerate before FSDP2 support has FSDP1 only
    refused = []
    if version != 2:
        refused.append(f"fsdp_version {version} in the accelerate config: only FSDP2 is supported, set fsdp_version: "
                       f"2 (as configs/accelerate/fsdp.yaml does)")
    if plugin.activation_checkpointing:
        refused.append("fsdp_activation_checkpointing: true in the accelerate config: the trainer checkpoints the "
                       "blocks itself (train.gradient_checkpointing); set it to false")
    if cfg.validation.prompts:
        refused.append("validation is not supported with FSDP (the sharded transformer cannot render on the main "
                       "process alone): remove validation.prompts, and render the exported LoRA afterwards with "
                       "`ltx-lora sample CONFIG --lora FILE`")
    if cfg.optim.optimizer == "adamw8bit":
        refused.append("optim.optimizer = 'adamw8bit' is not supported with FSDP (bitsandbytes does not take "
                       "sharded parameters); use 'adamw'")
    if cfg.train.fp8:
        refused.append("train.fp8 is not supported with FSDP (the fp8 weights are buffers, which FSDP does not "
                       "shard); set train.fp8: false, or train with DDP")
    if refused:
        raise ConfigError("FSDP: " + "\n  ".join(refused))


def open_dataset(cfg: RunConfig, target: ModelTarget, accelerator: Accelerator) -> LatentCache:
    """The latent cache, generated first when the config asks for synthetic data and none is there yet."""
    synthetic = cfg.data.synthetic
    if synthetic is not None and accelerator.is_main_process:
        ensure_synthetic_cache(
            cfg.data.cache_dir,
            target,
            num_samples=synthetic.num_samples,
            latent_frames=(synthetic.frames - 1) // 8 + 1,
            latent_height=synthetic.height // 32,
            latent_width=synthetic.width // 32,
            audio_tokens=audio_steps(synthetic.frames, synthetic.fps) if synthetic.audio else None,
            text_len=synthetic.text_len,
            fps=synthetic.fps,
            seed=synthetic.seed,
        )
    accelerator.wait_for_everyone()
    needs_reference = MODE_SPECS[cfg.mode].reference
    dataset = LatentCache(
        cfg.data.cache_dir,
        model_version=target.version,
        video_text_dim=target.video_text_dim,
        audio_text_dim=target.audio_text_dim,
        require_audio=cfg.mode in AUDIO_MODES,
        require_reference=needs_reference,
    )
    # The exported LoRA records the factors from the config (trainer/export.py): they must be the cache's.
    wanted = (cfg.data.reference_downscale, cfg.data.reference_temporal_scale)
    if needs_reference and dataset.reference_factors() != wanted:
        raise ConfigError(
            f"the references in {cfg.data.cache_dir} were taken at (data.reference_downscale, "
            f"data.reference_temporal_scale) = {dataset.reference_factors()}, the config says {wanted}: set "
            f"them to the cache's, or re-run preprocessing with the config's"
        )
    return dataset


def build_optimizer(params: list[torch.nn.Parameter], cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    kwargs = dict(lr=o.learning_rate, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    if o.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "optim.optimizer = 'adamw8bit' needs bitsandbytes: pip install 'ltx-lora[bnb]' "
                "(or use optim.optimizer = 'adamw')"
            ) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=device.type == "cuda", **kwargs)


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Learning-rate multiplier at `step`: linear warmup, then constant, linear or cosine decay to the final fraction."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    decay = 1.0 - progress if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.final_lr_fraction + (1.0 - o.final_lr_fraction) * decay


def drop_captions(batch: dict[str, Any], empty: dict[str, torch.Tensor], probability: float,
                  generator: torch.Generator) -> None:
    """Caption dropout: each sample's text becomes the empty prompt's with `probability`."""
    dropped = torch.rand(batch["text_mask"].shape[0], generator=generator) < probability
    for key, value in empty.items():
        batch[key][dropped.to(batch[key].device)] = value.to(batch[key].device, batch[key].dtype)


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch on `device`. An all-ones text mask (what the published connectors give: their registers replace the
    padding) becomes None, which means the same to the transformer and spares the text attentions an additive bias of
    zeros. It is checked on the host, before the copy, so that the step never waits for the GPU to answer."""
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if bool(batch["text_mask"].all()):
        on_device["text_mask"] = None
    return on_device


def noise_generator(seed: int, micro_batch: int) -> torch.Generator:
    """The generator of one micro-batch's sigmas and noise, a pure function of its place in the run's global sequence
    of micro-batches ((step * accumulation + micro step) * processes + rank). So P processes with accumulation A draw
    exactly what one process with accumulation P * A draws, as they read the same samples (data/batches.py)."""
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + micro_batch) % 2**63)  # seeds far apart


def _keep_metrics_until(path: Path, step: int) -> None:
    """On resume, drop metric lines a crashed run wrote after its last checkpoint."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def train(cfg: RunConfig, resume: bool = False, progress: bool = True, data_source: str | None = None) -> TrainResult:
    """Trains the LoRA the config describes; every input problem is raised before the model is built.

    With a data source (`data_source`, else `data.source`) the cache is first brought up to date from the media."""
    output_dir = Path(cfg.output_dir)
    check_output_dir(output_dir)
    target = get_target(cfg.model.target)
    identity = run_identity(cfg)

    checkpoint = None
    if resume:
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"--resume: no checkpoint in {output_dir / 'checkpoints'}; start without --resume")
        checkpoint = load_checkpoint(found[-1])
        check_identity(checkpoint, identity)

    if cfg.model.checkpoint is not None:
        check_checkpoint(target, cfg.model.checkpoint)

    if cfg.kernels == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("kernels = 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels slowly on the "
                          "CPU); use 'auto' or 'sdpa'")
    use_bf16 = cfg.train.mixed_precision == "bf16" or (cfg.train.mixed_precision == "auto" and torch.cuda.is_available())
    if use_bf16 and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision = 'bf16' needs a CUDA GPU; use 'auto' or 'no' on the CPU")
    # Adapters on an isolated stream get no gradient, which DDP must be told (suffix lists may reach anything).
    idle_groups = isolated_groups(cfg.mode)
    targets = cfg.lora_targets
    may_idle = isinstance(targets, list) or bool(idle_groups & set(PRESET_GROUPS[targets]))
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=may_idle)
    accelerator = Accelerator(
        mixed_precision="bf16" if use_bf16 else "no",
        cpu=not torch.cuda.is_available(),
        log_with="tensorboard",
        project_dir=str(output_dir),
        kwargs_handlers=[ddp_kwargs],
    )
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        check_fsdp(cfg, accelerator)
        # No FSDP casts: the frozen base stays bf16 and the LoRA fp32 (each gathered in its own dtype, the LoRA
        # gradients reduced in fp32) and the forward runs under autocast below, the same numerics as DDP.
        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy()
    source = data_source or cfg.data.source
    if source is not None:
        preprocess(cfg, source, progress=progress)
    dataset = open_dataset(cfg, target, accelerator)
    empty_prompt = dataset.empty_prompt() if cfg.train.caption_dropout_p > 0 else None
    if accelerator.is_main_process:
        (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.dump(), sort_keys=False), encoding="utf-8")

    # Before the transformer: validation encodes its prompts now and frees the text encoder.
    validator = Validator(cfg, accelerator)
    # With FSDP the weights load into host memory and FSDP moves each block's shard to the GPU (one whole block at
    # a time), so no GPU ever holds the whole model.
    model = build_transformer(
        target, cfg.model.checkpoint, cfg.model.init_seed, torch.bfloat16 if use_bf16 else torch.float32,
        torch.device("cpu") if fsdp else accelerator.device,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        modules = inject_lora(model, cfg.lora.rank, cfg.lora_alpha, cfg.lora.dropout, cfg.lora_targets)
    idle = [m for m in modules if group_of(m) in idle_groups]
    if idle:
        logger.warning("mode %s isolates one stream: the %d adapters on its modules (e.g. %s) will not learn",
                       cfg.mode, len(idle), idle[0])
    if cfg.train.fp8:
        check_fp8_device(accelerator.device)
        logger.info("fp8: %d frozen Linears of the blocks now in fp8", use_fp8_base_linears(model))
    if cfg.kernels == "triton":
        from ltx_kernels.install import install_attention  # imports Triton, which only this path needs

        install_attention(model)
    blocks = len(model.transformer_blocks)
    # auto: no block checkpointed here; on a GPU the memory plan below sets the blocks up, on the CPU they stay so
    setting = cfg.train.gradient_checkpointing
    checkpointed = 0 if setting == "auto" else _block_count(setting, blocks)
    offload = checkpoint_blocks(model, checkpointed, _block_count(cfg.train.offload_activations, blocks))
    recompute_feedforward(model, _block_count(cfg.train.recompute_feedforward, blocks), after=checkpointed)
    if cfg.train.compile is True or (cfg.train.compile == "auto" and accelerator.device.type == "cuda"):
        compile_blocks(model, cfg.train.activation_memory_budget)
    params = lora_parameters(model)
    optimizer = build_optimizer(params, cfg, accelerator.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    if checkpoint is not None:
        set_lora_state_dict(model, checkpoint.adapter)  # before FSDP shards the model: it shards the loaded values
    model, optimizer = accelerator.prepare(model, optimizer)
    if fsdp:
        params = lora_parameters(model)  # FSDP replaced them with sharded ones (and so did the optimizer's)
        logger.info("FSDP: each of %d blocks sharded over %d processes", blocks, accelerator.num_processes)
    memory_plan = None
    if plans_memory(cfg, accelerator.device):  # before the run's seeding: the probes' random numbers change nothing
        memory_plan = plan_memory(cfg, accelerator, model, optimizer, dataset, fsdp)
        offload = checkpoint_blocks(accelerator.unwrap_model(model), memory_plan.checkpointed, memory_plan.offloaded)
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    if offload:
        logger.info("activation offload on %d of %d blocks: their saved activations wait in host memory",
                    len(offload.offloaded), blocks)
        if accelerator.device.type == "cpu":
            logger.warning("train.offload_activations on the CPU copies activations into the memory they are "
                           "already in: it costs time and saves nothing (it is meant for GPUs)")

    start_step = 0
    if checkpoint is not None:
        load_optimizer_state(optimizer, checkpoint.optimizer_state)
        scheduler.load_state_dict(checkpoint.scheduler_state)
        restore_rng(checkpoint.rng)
        start_step = checkpoint.step
        logger.info("resuming from %s (step %d)", checkpoint.path, start_step)
    else:
        torch.manual_seed(cfg.train.seed)

    accum, world, rank = cfg.train.gradient_accumulation_steps, accelerator.num_processes, accelerator.process_index
    plan = BatchPlan(
        [dataset.shape_key(i) for i in range(len(dataset))],
        cfg.train.batch_size,
        cfg.train.seed,
        start=start_step * accum * world,
        rank=rank,
        world_size=world,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=plan, collate_fn=collate, num_workers=cfg.data.num_workers, pin_memory=use_bf16
    )
    batches = iter(loader)

    metrics_path = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        _keep_metrics_until(metrics_path, start_step) if checkpoint else metrics_path.unlink(missing_ok=True)
    accelerator.init_trackers("tensorboard")
    logger.info(
        "training %s: %d LoRA modules, %d trainable parameters, %d samples, mode %s",
        target.name, len(modules), sum(p.numel() for p in params), len(dataset), cfg.mode,
    )

    bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train", unit="step",
               disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    losses: list[float] = []
    bad_steps = 0
    step = start_step
    last_saved = checkpoint.path if checkpoint else None
    with logging_redirect_tqdm():  # log lines printed above the progress bar, not into it
        try:
            while step < cfg.train.steps:
                started = time.perf_counter()
                model.train()
                loss_sum = torch.zeros((), device=accelerator.device)
                parts_sum: dict[str, torch.Tensor] = {}
                for micro in range(accum):
                    batch = next(batches)
                    micro_batch = (step * accum + micro) * world + rank  # its place in the run's global sequence
                    if empty_prompt is not None:  # on the host, before the mask is looked at
                        dropout_generator = noise_generator(cfg.train.seed + 1, micro_batch)
                        drop_captions(batch, empty_prompt, cfg.train.caption_dropout_p, dropout_generator)
                    batch = batch_to_device(batch, accelerator.device)
                    generator = noise_generator(cfg.train.seed, micro_batch)
                    inputs = build_step_inputs(batch, cfg.mode, generator, cfg.conditioning.first_frame_p)
                    with accelerator.no_sync(model) if micro < accum - 1 else nullcontext():
                        # accelerate puts the model's forward under autocast itself, except with FSDP
                        with accelerator.autocast() if fsdp else nullcontext():
                            loss, parts = compute_loss(model, inputs)
                        accelerator.backward(loss / accum)
                    loss_sum += loss.detach() / accum
                    for name, value in parts.items():
                        parts_sum[name] = parts_sum.get(name, 0) + value / accum
                grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
                mean_loss = accelerator.reduce(loss_sum, "mean")
                finite = bool(torch.isfinite(mean_loss) and torch.isfinite(grad_norm))
                if finite:
                    optimizer.step()
                    bad_steps = 0
                else:
                    bad_steps += 1
                    logger.warning("step %d: non-finite loss or gradient (loss %s); step skipped", step + 1,
                                   mean_loss.item())
                optimizer.zero_grad(set_to_none=True)
                if offload and step == start_step:  # known after the first forward
                    logger.info("activation offload: %.2f GiB of pinned host memory per micro-batch",
                                offload.offloaded_bytes / 2**30)
                if memory_plan and step == start_step:
                    logger.info("first step: peak %.1f GiB of GPU memory allocated (planned for the largest sample: "
                                "%.1f GiB)", torch.cuda.max_memory_allocated(accelerator.device) / 2**30,
                                memory_plan.predicted_peak / 2**30)
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                if bad_steps >= cfg.train.max_bad_steps:
                    raise TrainingDiverged(
                        f"{bad_steps} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                        f"stopped. The last good checkpoint is {last_saved or 'none (no checkpoint was written yet)'}; "
                        f"lower optim.learning_rate or check the data, then resume with --resume"
                    )

                seconds = time.perf_counter() - started
                loss_value = mean_loss.item()
                losses.append(loss_value)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                              "sec_per_step": seconds, "skipped": not finite}
                    record.update({name: float(value) for name, value in parts_sum.items()})
                    accelerator.log(record, step=step)
                    if accelerator.is_main_process:
                        with metrics_path.open("a", encoding="utf-8") as f:
                            f.write(json.dumps(record) + "\n")
                if finite and (step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps):
                    last_saved = _save(accelerator, model, optimizer, scheduler, cfg, identity, step) or last_saved
                validator.after_step(step, model)
        except KeyboardInterrupt:
            bar.close()
            # Not under FSDP: Ctrl-C stops the processes inside different collectives, so gathering the shards now could
            # hang or pair the wrong tensors; the last regular checkpoint is the one to resume from.
            if step > start_step and bad_steps == 0 and not fsdp:
                last_saved = _save(accelerator, model, optimizer, scheduler, cfg, identity, step) or last_saved
            logger.warning("interrupted at step %d; checkpoint %s; continue with --resume", step, last_saved)
            raise
        bar.close()

    exported: list[Path] = []
    adapter = get_lora_state_dict(accelerator.unwrap_model(model))  # on every process: FSDP gathers the shards
    if accelerator.is_main_process:
        exported = export_run(cfg, adapter, output_dir)
        for path in exported:
            logger.info("exported %s", path)
    # Every process reaches the end before any takes the process group down (end_training destroys it): a process
    # that tore it down while the main one was still exporting once aborted at exit under FSDP on gloo.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir=output_dir, final_step=step, exported=exported, losses=losses)


def _save(accelerator, model, optimizer, scheduler, cfg: RunConfig, identity: dict[str, Any], step: int) -> Path | None:
    # Gathered on every process (under FSDP each holds only shards), written by the main one.
    adapter = get_lora_state_dict(accelerator.unwrap_model(model))
    optimizer_state = full_optimizer_state(optimizer)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    return save_checkpoint(cfg.output_dir, step, adapter, optimizer_state, scheduler, identity, cfg.train.keep_last)
