"""Character, style and motion presets: rank, targets, learning rate and length, merged under a user config.

A recipe only fills in what the user did not set: every field stays overridable in the YAML or with `--set`.
Alpha is left unset (it follows the rank, scale 1), so overriding the rank alone never changes the LoRA scale.
"""

from __future__ import annotations

from typing import Any

# Motion lives in how tokens attend across time: self-attention and the feed-forward, not the text cross-attention.
_MOTION_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"]

RECIPES: dict[str, dict[str, Any]] = {
    # A person or creature, with voice in audio modes: high capacity, every module of the generated modalities.
    "character": {
        "lora": {"rank": 32, "targets": "auto"},
        "optim": {"learning_rate": 1e-4},
        "train": {"steps": 2000},
    },
    # A look (palette, texture, grading): lower rank generalises better, trains faster at a higher rate.
    "style": {
        "lora": {"rank": 16, "targets": "auto"},
        "optim": {"learning_rate": 2e-4},
        "train": {"steps": 1500},
    },
    # A camera move or action: small rank on the video self-attention and feed-forward.
    "motion": {
        "lora": {"rank": 8, "targets": _MOTION_TARGETS},
        "optim": {"learning_rate": 1e-4},
        "train": {"steps": 2000},
    },
}
