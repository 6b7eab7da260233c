"""Prompt encoding: a tiny Gemma 3 saved in the published layout loads back and, with tiny connectors of both
versions, gives exactly what diffusers' `LTX2Pipeline` gives; broken Gemma directories are refused with clear errors.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import LTX2Pipeline
from diffusers.pipelines.ltx2 import LTX2TextConnectors
from safetensors.torch import load_file, save_file
from tiny_gemma import HIDDEN_SIZE, NUM_LAYERS, write_tiny_gemma
from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

from trainer.models.registry import TARGETS
from trainer.models.text import PromptEncoder, TextEncoderError, load_text_encoder
from trainer.models.tiny import tiny_connectors, tiny_text_encoder

MAX_LENGTH = 16  # a multiple of the connectors' 4 registers, as 1024 is of the published 128
TARGET = {"2.0": TARGETS["tiny-ltx-2"], "2.3": TARGETS["tiny-ltx-2.3"]}
# Prompts of different lengths (so left padding and masks matter), one with surrounding spaces, one past MAX_LENGTH.
PROMPTS = [
    "a cat walks",
    "  the dog runs in the park and barks at a red ball ",
    "rain falls on the city street at night, cars pass by while a man speaks softly to the camera",
]

def _connectors(version: str, dtype: torch.dtype = torch.float32) -> LTX2TextConnectors:
    """The tiny connectors of the package, sized to the tiny targets and the tiny Gemma's hidden states."""
    return tiny_connectors(TARGET[version], tiny_text_encoder()[0], seed=1).to(dtype)


def _load_tiny(path, dtype: torch.dtype = torch.float32):
    return load_text_encoder(path, expected_hidden_size=HIDDEN_SIZE, expected_layers=NUM_LAYERS, dtype=dtype)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return write_tiny_gemma(tmp_path_factory.mktemp("gemma"))


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    return _load_tiny(gemma_dir)


def _diffusers_reference(gemma_dir, connectors, prompts, dtype=torch.float32):
    """What `LTX2Pipeline.__call__` hands the transformer, with the text encoder as diffusers loads it (the full
    `Gemma3ForConditionalGeneration`): `encode_prompt`, then the connector call that follows it in `__call__`."""
    text_encoder = Gemma3ForConditionalGeneration.from_pretrained(gemma_dir, dtype=dtype, local_files_only=True)
    text_encoder.eval()
    tokenizer = AutoTokenizer.from_pretrained(gemma_dir, local_files_only=True)
    pipe = LTX2Pipeline(
        scheduler=None, vae=None, audio_vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
        connectors=connectors, transformer=None, vocoder=None,
    )
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=MAX_LENGTH, device="cpu"
        )
        return pipe.connectors(embeds, mask, padding_side=pipe.tokenizer.padding_side)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("version", ["2.0", "2.3"])
def test_encode_matches_the_diffusers_pipeline(gemma_dir, version, dtype):
    model, tokenizer = _load_tiny(gemma_dir, dtype)
    connectors = _connectors(version, dtype)
    out = PromptEncoder(tokenizer, model, connectors, TARGET[version], max_length=MAX_LENGTH).encode(PROMPTS)
    video, audio, mask = _diffusers_reference(gemma_dir, connectors, PROMPTS, dtype)

    assert out["video_text_embeds"].shape == (3, MAX_LENGTH, TARGET[version].video_text_dim)
    assert out["audio_text_embeds"].shape == (3, MAX_LENGTH, TARGET[version].audio_text_dim)
    assert out["video_text_embeds"].dtype == out["audio_text_embeds"].dtype == dtype
    torch.testing.assert_close(out["video_text_embeds"], video, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["audio_text_embeds"], audio, rtol=0, atol=1e-6)
    assert out["text_mask"].dtype == torch.int64
    assert torch.equal(out["text_mask"], mask)
    # The padding became learnt registers, so the transformer attends to every position (as published).
    assert torch.equal(mask, torch.ones(3, MAX_LENGTH, dtype=torch.int64))


def test_tokens_are_left_padded_and_start_with_bos(gemma):
    model, tokenizer = gemma
    encoder = PromptEncoder(tokenizer, model, _connectors("2.3"), TARGET["2.3"], max_length=MAX_LENGTH)
    ids, mask = encoder.tokenize(PROMPTS)

    assert ids.shape == mask.shape == (3, MAX_LENGTH) and ids.dtype == mask.dtype == torch.int64
    for row, prompt in enumerate(PROMPTS):
        n = min(len(tokenizer(prompt.strip()).input_ids), MAX_LENGTH)
        pad = MAX_LENGTH - n
        assert ids[row, :pad].tolist() == [tokenizer.pad_token_id] * pad
        assert ids[row, pad] == tokenizer.bos_token_id
        assert mask[row].tolist() == [0] * pad + [1] * n
    assert mask[2].all()  # the long prompt is truncated to MAX_LENGTH, BOS kept
    assert ids[2, 1:].tolist() == tokenizer(PROMPTS[2]).input_ids[1:MAX_LENGTH]


def test_bos_is_forced_where_diffusers_relies_on_the_tokenizer(tmp_path, gemma):
    """ltx-core prepends BOS when the tokenizer does not; diffusers' pipeline does not. A Gemma tokenizer without
    its BOS post-processor gives the same embeddings as the published one here, and different ones in diffusers."""
    model, tokenizer = gemma
    write_tiny_gemma(tmp_path, add_bos_token=False)
    no_bos_model, no_bos_tokenizer = _load_tiny(tmp_path)
    assert no_bos_tokenizer("a cat").input_ids[0] != no_bos_tokenizer.bos_token_id
    connectors = _connectors("2.3")

    ours = PromptEncoder(no_bos_tokenizer, no_bos_model, connectors, TARGET["2.3"], MAX_LENGTH).encode(PROMPTS)
    published = PromptEncoder(tokenizer, model, connectors, TARGET["2.3"], MAX_LENGTH).encode(PROMPTS)
    torch.testing.assert_close(ours["video_text_embeds"], published["video_text_embeds"], rtol=0, atol=0)
    torch.testing.assert_close(ours["audio_text_embeds"], published["audio_text_embeds"], rtol=0, atol=0)
    diffusers_video, _, _ = _diffusers_reference(tmp_path, connectors, PROMPTS)
    assert not torch.allclose(diffusers_video, ours["video_text_embeds"], atol=1e-3)


def test_loads_both_published_key_layouts(tmp_path, gemma_dir, gemma):
    """transformers saves `language_model.model.*`; newer hub uploads hold `model.language_model.*`."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(gemma_dir / name, tmp_path / name)
    state = load_file(gemma_dir / "model.safetensors")
    assert any(key.startswith("language_model.model.") for key in state)
    save_file({key.replace("language_model.model.", "model.language_model."): value for key, value in state.items()},
              tmp_path / "model.safetensors")
    model, _ = _load_tiny(tmp_path)
    for name, value in gemma[0].state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def _partial_copy(src, dst, names):
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


def test_refuses_a_missing_directory(tmp_path):
    with pytest.raises(TextEncoderError, match="no Gemma 3 directory at .*absent.*google/gemma-3-12b-it.*tokenizer"):
        _load_tiny(tmp_path / "absent")


def test_refuses_a_directory_without_config(tmp_path, gemma_dir):
    _partial_copy(gemma_dir, tmp_path, ["model.safetensors", "tokenizer.json"])
    with pytest.raises(TextEncoderError, match="has no config.json.*download google/gemma-3-12b-it"):
        _load_tiny(tmp_path)


def test_refuses_missing_tokenizer_files(tmp_path, gemma_dir):
    _partial_copy(gemma_dir, tmp_path, ["config.json", "model.safetensors", "tokenizer_config.json"])
    with pytest.raises(TextEncoderError, match=f"{tmp_path} lacks the tokenizer file\\(s\\) tokenizer.json;"):
        _load_tiny(tmp_path)


def test_refuses_pickled_weights_without_unpickling(tmp_path, gemma_dir):
    _partial_copy(gemma_dir, tmp_path, ["config.json", "tokenizer.json", "tokenizer_config.json"])
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle: unpickling this would fail with another error")
    with pytest.raises(TextEncoderError, match="only as pickles \\(pytorch_model.bin\\).*convert them to safetensors"):
        _load_tiny(tmp_path)


def test_refuses_a_directory_without_weights(tmp_path, gemma_dir):
    _partial_copy(gemma_dir, tmp_path, ["config.json", "tokenizer.json", "tokenizer_config.json"])
    with pytest.raises(TextEncoderError, match="has no model\\*.safetensors weights"):
        _load_tiny(tmp_path)


def test_refuses_weights_without_the_language_model(tmp_path, gemma_dir):
    """transformers would fill absent tensors with random values; a silently random text encoder must not load."""
    _partial_copy(gemma_dir, tmp_path, ["config.json", "tokenizer.json", "tokenizer_config.json"])
    state = load_file(gemma_dir / "model.safetensors")
    save_file({key.replace("language_model.model.", "text."): value for key, value in state.items()},
              tmp_path / "model.safetensors")
    with pytest.raises(TextEncoderError, match="lack .* language-model tensor\\(s\\).*language_model.model."):
        _load_tiny(tmp_path)


def test_refuses_another_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(TextEncoderError, match="declares model_type 't5'.*Gemma 3 12B"):
        _load_tiny(tmp_path)


def test_refuses_other_gemma3_sizes(tmp_path, gemma_dir):
    with pytest.raises(TextEncoderError, match="is Gemma 3 of unknown size \\(hidden size 24, 2 layers\\); "
                                               "LTX-2 needs Gemma 3 12B \\(hidden size 3840, 48 layers\\)"):
        load_text_encoder(gemma_dir)
    config = {"model_type": "gemma3", "text_config": {"hidden_size": 2560, "num_hidden_layers": 34}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TextEncoderError, match="is Gemma 3 4B .*LTX-2 needs Gemma 3 12B"):
        load_text_encoder(tmp_path)


def test_prompt_encoder_refuses_parts_that_do_not_fit(gemma):
    model, tokenizer = gemma
    with pytest.raises(TextEncoderError, match="connectors are LTX-2.3's .* target 'tiny-ltx-2' is LTX-2.0"):
        PromptEncoder(tokenizer, model, _connectors("2.3"), TARGET["2.0"], max_length=MAX_LENGTH)
    with pytest.raises(TextEncoderError, match="max_length 10 is not a multiple of the video connector's 4"):
        PromptEncoder(tokenizer, model, _connectors("2.3"), TARGET["2.3"], max_length=10)
