"""The tiny Gemma 3 text encoder of trainer/models/tiny.py saved as a Hugging Face directory in the published layout.

The model is saved whole, as `Gemma3ForConditionalGeneration` (vision tower included) as google/gemma-3-12b-it is
published, so the loader meets the same checkpoint keys.
"""

from __future__ import annotations

from pathlib import Path

from trainer.models.tiny import GEMMA_HIDDEN_SIZE, GEMMA_LAYERS, tiny_gemma, tiny_tokenizer

HIDDEN_SIZE = GEMMA_HIDDEN_SIZE
NUM_LAYERS = GEMMA_LAYERS


def write_tiny_gemma(root: Path, add_bos_token: bool = True, seed: int = 0) -> Path:
    """Save model (safetensors) and tokenizer into `root` as `save_pretrained` does; returns `root`."""
    tokenizer = tiny_tokenizer(add_bos_token)
    tiny_gemma(len(tokenizer), seed).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root
