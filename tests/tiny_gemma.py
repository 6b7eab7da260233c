"""A tiny Gemma 3 text encoder directory in the published Hugging Face layout, built offline for tests.

The model is `Gemma3ForConditionalGeneration` (vision tower included) as google/gemma-3-12b-it is published, so the
loader meets the same checkpoint keys; the tokenizer is a BPE trained here on a few sentences and wrapped in
`GemmaTokenizer`, with the BOS post-processor the real tokenizer.json carries.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GemmaTokenizer,
    SiglipVisionConfig,
)

HIDDEN_SIZE = 24
NUM_LAYERS = 2  # => 3 hidden states with the embeddings, the connectors' `text_proj_in_factor`

# Gemma's special token ids: pad 0, eos 1, bos 2, unk 3, mask 4.
_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
_CORPUS = [
    "a cat walks slowly along the beach at sunset while waves crash on the rocks",
    "the dog runs in the park and barks at a red ball",
    "a man speaks softly to the camera in a quiet room",
    "rain falls on the city street at night, cars pass by",
]


def build_tokenizer(add_bos_token: bool = True) -> GemmaTokenizer:
    """Gemma's BPE pipeline (spaces as "▁", byte fallback) with a vocabulary learnt from `_CORPUS`."""
    trainer_tokenizer = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tokenizer.normalizer = normalizers.Replace(" ", "▁")
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_previous")
    trainer_tokenizer.train_from_iterator(
        _CORPUS, BpeTrainer(vocab_size=128, special_tokens=_SPECIAL_TOKENS, show_progress=False)
    )
    model = json.loads(trainer_tokenizer.to_str())["model"]
    return GemmaTokenizer(
        vocab=model["vocab"], merges=[tuple(pair) for pair in model["merges"]], add_bos_token=add_bos_token
    )


def build_model(vocab_size: int, seed: int = 0) -> Gemma3ForConditionalGeneration:
    """A 2-layer Gemma 3 (one sliding-window, one global layer, as the real one alternates) with a tiny SigLIP."""
    text_config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN_SIZE, intermediate_size=48, num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=4, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    vision_config = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = Gemma3Config(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), mm_tokens_per_image=4
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Gemma3ForConditionalGeneration(config).eval()


def write_tiny_gemma(root: Path, add_bos_token: bool = True) -> Path:
    """Save model (safetensors) and tokenizer into `root` as `save_pretrained` does; returns `root`."""
    tokenizer = build_tokenizer(add_bos_token)
    build_model(len(tokenizer)).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root
