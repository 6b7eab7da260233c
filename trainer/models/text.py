"""Prompt encoding: Gemma 3 hidden states, through the LTX text connectors, into the transformer's text embeddings.

Both targets read all 49 hidden states of Gemma 3 12B (embeddings + 48 layers) for prompts of 1024 tokens, left padded
and starting with BOS. The published recipe (Lightricks ltx-core; diffusers `LTX2Pipeline`) is followed step by step:

1. tokens: strip the prompt, tokenize with truncation, force a leading BOS, left-pad to the maximum length
   (ltx-core `LTXGemmaTokenizer.tokenize_with_weights`);
2. Gemma forward with all hidden states, stacked on a last axis and packed to [B, L, hidden * layers]
   (diffusers `LTX2Pipeline._get_gemma_prompt_embeds`);
3. the connectors, diffusers' `LTX2TextConnectors`: feature extraction (LTX-2: per-layer masked mean/range norm and
   `text_proj_in`; LTX-2.3: per-token RMS norm and the per-modality `video_text_proj_in` / `audio_text_proj_in`), then
   the 1D transformer blocks, which replace the padding with learnt registers.

Deviation from diffusers, on purpose: diffusers relies on the tokenizer to add BOS, ltx-core forces it; we force it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, Gemma3Config, Gemma3TextModel

from trainer.models.registry import ModelTarget

GEMMA3_12B_HIDDEN_SIZE = 3840
GEMMA3_12B_LAYERS = 48

# (hidden size, layers) of the published Gemma 3 sizes, to name what a user downloaded by mistake.
_GEMMA3_SIZES = {(640, 18): "270M", (1152, 26): "1B", (2560, 34): "4B", (3840, 48): "12B", (5376, 62): "27B"}

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_DOWNLOAD_HINT = (
    "download google/gemma-3-12b-it (gated: accept its licence on Hugging Face first) into {path}, e.g. "
    "`hf download google/gemma-3-12b-it --local-dir {path}`; the directory needs config.json, model*.safetensors, "
    "tokenizer.json and tokenizer_config.json"
)

# Checkpoints hold the language model under `language_model.model.` (as Google published Gemma 3 and transformers
# writes it) or under transformers' module names `model.language_model.` (as some saved copies do).
_LANGUAGE_MODEL_PREFIX = r"^(?:language_model\.model|model\.language_model)\."


class _Gemma3LanguageModel(Gemma3TextModel):
    """Gemma 3's language model read out of the full checkpoint: the vision tower and LM head stay unread."""

    _keys_to_ignore_on_load_unexpected = [r"vision_tower\.", r"multi_modal_projector\.", r"^lm_head\."]


class TextEncoderError(ValueError):
    """A Gemma directory that cannot serve as the LTX-2 text encoder, or parts that do not fit together."""


def load_text_encoder(
    path: str | Path,
    expected_hidden_size: int | None = GEMMA3_12B_HIDDEN_SIZE,
    expected_layers: int | None = GEMMA3_12B_LAYERS,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """The Gemma 3 language model (frozen, eval mode) and its tokenizer from a local Hugging Face directory.

    Only the language model is built: the vision tower and LM head of the published `Gemma3ForConditionalGeneration`
    checkpoint play no part in the hidden states. Nothing is downloaded; weights are read from safetensors only.
    The expected size defaults to Gemma 3 12B, which both targets need; None skips the check (tiny test models).
    """
    root = Path(path)
    if not root.is_dir():
        raise TextEncoderError(f"no Gemma 3 directory at {root}: " + _DOWNLOAD_HINT.format(path=root))
    if not (root / "config.json").is_file():
        raise TextEncoderError(f"{root} has no config.json, so it is not a Hugging Face model directory; "
                               + _DOWNLOAD_HINT.format(path=root))
    model_type = json.loads((root / "config.json").read_text()).get("model_type")
    if model_type != "gemma3":
        raise TextEncoderError(
            f"{root / 'config.json'} declares model_type {model_type!r}; the LTX-2 text encoder is Gemma 3 12B "
            "(model_type 'gemma3', Gemma3ForConditionalGeneration as google/gemma-3-12b-it is published)"
        )
    text_config = Gemma3Config.from_pretrained(root, local_files_only=True).text_config
    _check_size(root, text_config.hidden_size, text_config.num_hidden_layers, expected_hidden_size, expected_layers)
    missing = [name for name in _TOKENIZER_FILES if not (root / name).is_file()]
    if missing:
        raise TextEncoderError(f"{root} lacks the tokenizer file(s) {', '.join(missing)}; "
                               + _DOWNLOAD_HINT.format(path=root))
    _check_safetensors_weights(root)

    model, info = _Gemma3LanguageModel.from_pretrained(
        root,
        config=text_config,
        key_mapping={_LANGUAGE_MODEL_PREFIX: ""},
        dtype=dtype,
        device_map=device,
        use_safetensors=True,
        local_files_only=True,
        output_loading_info=True,
    )
    if info["missing_keys"]:
        raise TextEncoderError(
            f"the safetensors weights in {root} lack {len(info['missing_keys'])} language-model tensor(s), e.g. "
            f"{sorted(info['missing_keys'])[:3]}; expected keys under 'language_model.model.' or "
            "'model.language_model.' as in the published Gemma 3 checkpoints"
        )
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    return model, tokenizer


class PromptEncoder:
    """Prompts -> the text inputs of the LTX-2 transformer, as the published pipeline computes them."""

    def __init__(self, tokenizer, text_encoder, connectors, target: ModelTarget, max_length: int = 1024):
        _check_parts(tokenizer, text_encoder, connectors, target, max_length)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.connectors = connectors
        self.max_length = max_length
        self.bos_id = tokenizer.bos_token_id
        # Pads are masked out everywhere after the Gemma forward; Gemma's tokenizer has one, eos is the usual fallback.
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask [B, max_length] (int64): pad..pad, BOS, prompt tokens; truncated to max_length."""
        encoded = self.tokenizer(
            [prompt.strip() for prompt in prompts], truncation=True, max_length=self.max_length, padding=False
        )["input_ids"]
        ids, mask = [], []
        for tokens in encoded:
            if not tokens or tokens[0] != self.bos_id:
                tokens = [self.bos_id, *tokens][: self.max_length]
            padding = self.max_length - len(tokens)
            ids.append([self.pad_id] * padding + tokens)
            mask.append([0] * padding + [1] * len(tokens))
        return torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.int64)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """One batch of prompts -> `video_text_embeds` [B, L, Dv], `audio_text_embeds` [B, L, Da], `text_mask` [B, L].

        `text_mask` is the mask the pipeline hands the transformer: with learnt registers (all published connectors)
        the padding is replaced by registers, so it is all ones. The memory peak is the packed hidden states,
        B x L x hidden x 49 in Gemma's dtype (385 MB per prompt for 12B in bf16) plus the connectors' normalisation
        temporaries of that size: choose the batch accordingly.
        """
        packed, token_mask = self.features(prompts)
        video, audio, text_mask = self.connectors(packed, token_mask.to(self.connectors.device), padding_side="left")
        return {"video_text_embeds": video, "audio_text_embeds": audio, "text_mask": text_mask}

    @torch.no_grad()
    def features(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-2 only: the packed Gemma hidden states [B, L, hidden * layers] in the connectors' dtype and device,
        and the token mask [B, L] (int64, CPU). This is what diffusers' LTX-2 pipelines take as `prompt_embeds` and
        `prompt_attention_mask`: they run the connectors themselves."""
        input_ids, token_mask = self.tokenize(prompts)
        device = self.text_encoder.device
        hidden_states = self.text_encoder(
            input_ids=input_ids.to(device), attention_mask=token_mask.to(device), output_hidden_states=True
        ).hidden_states
        packed = torch.stack(hidden_states, dim=-1).flatten(2, 3)  # [B, L, hidden * layers], hidden-major
        del hidden_states
        return packed.to(device=self.connectors.device, dtype=self.connectors.dtype), token_mask


def _check_size(root: Path, hidden_size: int, layers: int, expected_hidden_size: int | None,
                expected_layers: int | None) -> None:
    if expected_hidden_size is None or (hidden_size, layers) == (expected_hidden_size, expected_layers):
        return
    found = _GEMMA3_SIZES.get((hidden_size, layers), "of unknown size")
    wanted = _GEMMA3_SIZES.get((expected_hidden_size, expected_layers))
    wanted = f"Gemma 3 {wanted}" if wanted else "a Gemma 3"
    raise TextEncoderError(
        f"{root} is Gemma 3 {found} (hidden size {hidden_size}, {layers} layers); LTX-2 needs {wanted} "
        f"(hidden size {expected_hidden_size}, {expected_layers} layers): download google/gemma-3-12b-it"
    )


def _check_safetensors_weights(root: Path) -> None:
    """Weights must be safetensors: a pickled checkpoint can run code when loaded, so it is never opened."""
    if any(root.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in _PICKLE_PATTERNS for p in root.glob(pattern))
    if pickles:
        raise TextEncoderError(
            f"{root} holds its weights only as pickles ({', '.join(pickles)}), which are never loaded (unpickling can "
            "run code); convert them to safetensors (e.g. load once in a trusted environment and `save_pretrained`) "
            "or download the safetensors files of google/gemma-3-12b-it"
        )
    raise TextEncoderError(f"{root} has no model*.safetensors weights; " + _DOWNLOAD_HINT.format(path=root))


def _check_parts(tokenizer, text_encoder, connectors, target: ModelTarget, max_length: int) -> None:
    """The pieces must come from one release: a mismatch would otherwise be a silent wrong reshape or a late error."""
    if tokenizer.bos_token_id is None:
        raise TextEncoderError("the tokenizer has no BOS token; LTX-2 prompts start with Gemma's <bos>")
    cfg = connectors.config
    connectors_version = "2.3" if cfg.per_modality_projections else "2.0"
    if connectors_version != target.version:
        raise TextEncoderError(
            f"the text connectors are LTX-{connectors_version}'s (per_modality_projections="
            f"{cfg.per_modality_projections}) but target {target.name!r} is LTX-{target.version}"
        )
    gemma = text_encoder.config.get_text_config()
    if (cfg.caption_channels, cfg.text_proj_in_factor) != (gemma.hidden_size, gemma.num_hidden_layers + 1):
        raise TextEncoderError(
            f"the text connectors take {cfg.text_proj_in_factor} hidden states of width {cfg.caption_channels}, "
            f"the text encoder gives {gemma.num_hidden_layers + 1} of width {gemma.hidden_size}"
        )
    widths = (connectors.video_connector.inner_dim, connectors.audio_connector.inner_dim)
    if widths != (target.video_text_dim, target.audio_text_dim):
        raise TextEncoderError(
            f"the text connectors give video/audio embeddings of width {widths[0]}/{widths[1]}, target "
            f"{target.name!r} takes {target.video_text_dim}/{target.audio_text_dim}"
        )
    for stream in ("video", "audio"):
        registers = cfg[f"{stream}_connector_num_learnable_registers"]
        if registers and max_length % registers:
            raise TextEncoderError(
                f"max_length {max_length} is not a multiple of the {stream} connector's {registers} learnt registers"
            )
