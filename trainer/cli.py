"""The `ltx-lora` command: parse arguments, call the library, report. Errors a user can fix exit with code 2 and
one clear message instead of a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError
from trainer.data.cache import CacheError
from trainer.lora_files import LoraFileError
from trainer.models.loading import WeightsError
from trainer.models.text import TextEncoderError

USER_ERRORS = (ConfigError, CheckpointError, CacheError, LoraFileError, WeightsError, TextEncoderError)


def _train(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.train import TrainingDiverged, train

    cfg = load_config(args.config, args.set)
    try:
        result = train(cfg, resume=args.resume, data_source=args.data)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result.exported:  # the main process exports; the others of a multi-GPU run have nothing to add
        print(f"done: step {result.final_step}; LoRA written to:")
        for path in result.exported:
            print(f"  {path}")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.data.preprocess import REPORT, preprocess

    cfg = load_config(args.config, args.set)
    report = preprocess(cfg, args.data)
    print(report.summary())
    print(f"cache: {cfg.data.cache_dir} (report: {Path(cfg.data.cache_dir) / REPORT})")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from trainer.data.demo import write_demo_dataset

    files = write_demo_dataset(args.dir)
    print(f"demo dataset in {args.dir}: {len(files)} files")
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainer.export import export_file

    written = export_file(Path(args.source), Path(args.output), args.format)
    print(f"wrote {written}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from trainer.lora_files import describe_lora, read_lora

    print(describe_lora(read_lora(Path(args.file))))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.sample import sample_lora

    cfg = load_config(args.config)
    written = sample_lora(cfg, Path(args.lora), args.prompt, Path(args.out) if args.out else None, args.steps,
                          args.seed)
    print(f"wrote {len(written)} videos (base, LoRA, side by side per prompt):")
    for path in written:
        print(f"  {path}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _check_weights(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.models.loading import check_weights
    from trainer.models.registry import check_checkpoint, get_target

    source = Path(args.source)
    if source.suffix in (".yaml", ".yml"):
        cfg = load_config(source)
        if cfg.model.checkpoint is None:
            print(f"{source}: model {cfg.model.target} has no checkpoint (random weights); nothing to check")
            return 0
        target = get_target(cfg.model.target)
        check_checkpoint(target, cfg.model.checkpoint)
        paths = [cfg.model.checkpoint] + ([cfg.model.components] if cfg.model.components else [])
    else:
        cfg, paths = None, [str(source)]
    for path in paths:
        print(check_weights(path))
    if cfg is not None and cfg.model.text_encoder is not None:
        print(_check_text_encoder(cfg.model.text_encoder, tiny=target.tiny))
    return 0


def _check_text_encoder(path: str, tiny: bool) -> str:
    import torch

    from trainer.models.text import load_text_encoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = {"expected_hidden_size": None, "expected_layers": None} if tiny else {}
    model, tokenizer = load_text_encoder(path, dtype=torch.bfloat16, device=device, **sizes)
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    return (f"{path}\n  text encoder  Gemma 3, hidden size {config.hidden_size}, {config.num_hidden_layers} layers, "
            f"{parameters / 1e9:.2f}B parameters; tokenizer with {len(tokenizer)} tokens, BOS {tokenizer.bos_token!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltx-lora", description="LoRA training for LTX-2.3 and LTX-2.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a LoRA from a YAML config")
    train.add_argument("config", help="path to the run's YAML config")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.steps=100 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    train.add_argument("--data", metavar="DIR_OR_MANIFEST",
                       help="media to preprocess into data.cache_dir first (default: data.source)")
    train.set_defaults(run=_train)

    prep = commands.add_parser("preprocess", help="turn media and captions into the latent cache training reads")
    prep.add_argument("config", help="path to the run's YAML config (model, data.cache_dir, buckets, fps)")
    prep.add_argument("--data", metavar="DIR_OR_MANIFEST",
                      help="a media folder or a CSV/JSONL manifest (default: data.source)")
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    prep.set_defaults(run=_preprocess)

    demo = commands.add_parser("demo-data", help="write a small synthetic dataset of clips with sound and captions")
    demo.add_argument("dir", help="where to write it")
    demo.set_defaults(run=_demo_data)

    export = commands.add_parser("export", help="convert a LoRA file or a training checkpoint to another format")
    export.add_argument("source", help="a LoRA .safetensors file, or a checkpoint folder (output_dir/checkpoints/step-N)")
    export.add_argument("output", help="the file to write")
    export.add_argument("--format", choices=["comfyui", "diffusers"], default="comfyui",
                        help="comfyui: diffusion_model.* keys; diffusers: transformer.* keys (default: comfyui)")
    export.set_defaults(run=_export)

    inspect = commands.add_parser("inspect", help="show a LoRA file's target, rank, modules and problems")
    inspect.add_argument("file", help="a LoRA .safetensors file")
    inspect.set_defaults(run=_inspect)

    check = commands.add_parser("check-weights", help="load and verify the weights a config (or a path) names")
    check.add_argument("source", help="a run config (.yaml), or a checkpoint file or diffusers folder")
    check.set_defaults(run=_check_weights)

    sample = commands.add_parser("sample", help="render prompts with a finished LoRA beside the base model")
    sample.add_argument("config", help="a run config: model, mode and the validation section's sampling settings")
    sample.add_argument("--lora", required=True, help="the LoRA .safetensors file (ComfyUI or diffusers layout)")
    sample.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a prompt to render (repeatable; default: the config's validation.prompts)")
    sample.add_argument("--out", metavar="DIR", help="where to write (default: <output_dir>/samples/<LoRA file name>)")
    sample.add_argument("--steps", type=_positive_int, help="denoising steps (default: validation.num_inference_steps)")
    sample.add_argument("--seed", type=int, help="noise seed, the same for base and LoRA (default: validation.seed)")
    sample.set_defaults(run=_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under `accelerate launch` every process runs this: the first logs what it does, the others only their warnings.
    first_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if first_process else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
