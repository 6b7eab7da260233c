"""Tiny random-weight VAEs, text encoder, tokenizer and text connectors for the tiny targets, built offline from a seed.

The smoke run and the tests push real media through the real preprocessing path with these, so each keeps the
interface of its production counterpart exactly and shrinks only depth and widths:
- video VAE: 32x spatial and 8x temporal compression with a causal first frame (8k+1 frames -> k+1 latent frames),
  128 latent channels, non-trivial per-channel latent statistics;
- audio VAE: stereo log-mel [B, 2, T, 64] -> latents [B, 8, T/4, 16], with statistics over the 128 packed features;
- text encoder: a Gemma 3 language model (2 layers, width 24) and a word-level tokenizer with Gemma's special tokens;
- text connectors: diffusers' `LTX2TextConnectors` of the target's version, sized to the tiny Gemma and the target;
- vocoder: the target version's (LTX-2: `LTX2Vocoder` at 24 kHz; LTX-2.3: `LTX2VocoderWithBWE`, 16 kHz then 48 kHz)
  with the production upsampling factors, so generated audio has the production sample rate and length.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video
from diffusers.pipelines.ltx2 import LTX2TextConnectors, LTX2Vocoder, LTX2VocoderWithBWE
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

from trainer.models.registry import ModelTarget

GEMMA_HIDDEN_SIZE = 24
GEMMA_LAYERS = 2  # => 3 hidden states with the embeddings: the connectors' `text_proj_in_factor`
# Learnt registers per connector: any prompt length that is a multiple of 4 works (production: 128 for 1024 tokens).
CONNECTOR_REGISTERS = 4

# The production compression with narrow blocks. Diffusers' encoder runs its first convolution at `latent_channels`
# width, so that one stays wide. Down: spatial, temporal, then two spatio-temporal steps after the 4x4 patchify
# (4 * 2**3 = 32 spatial, 2**3 = 8 temporal); up mirrors it, as the LTX-2.3 decoder does (no residual upsamplers).
VIDEO_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=128, block_out_channels=(16, 32, 64, 64),
    decoder_block_out_channels=(16, 32, 32, 64), layers_per_block=(1, 1, 1, 1, 1),
    decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, True),
    decoder_spatio_temporal_scaling=(True, True, True, True), decoder_inject_noise=(False,) * 5,
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    upsample_type=("spatiotemporal", "spatiotemporal", "temporal", "spatial"), upsample_residual=(False,) * 4,
    upsample_factor=(2, 2, 1, 2), timestep_conditioning=False, patch_size=4, patch_size_t=1, resnet_norm_eps=1e-6,
    encoder_causal=True, decoder_causal=False, encoder_spatial_padding_mode="zeros",
    decoder_spatial_padding_mode="zeros", spatial_compression_ratio=32, temporal_compression_ratio=8,
)

# Three levels give the production 4x compression of time and mel bins (64 -> 16). `base_channels` stays at the
# production 128 because diffusers sizes the latent statistics by it, and they normalise the 128 packed features
# (8 channels x 16 bins); `ch_mult` of ones keeps the model small all the same.
AUDIO_VAE_CONFIG = dict(
    base_channels=128, output_channels=2, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=None, in_channels=2,
    resolution=256, latent_channels=8, norm_type="pixel", causality_axis="height", dropout=0.0,
    mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=64, double_z=True,
)

# Gemma's special tokens at Gemma's ids: pad 0, eos 1, bos 2, unk 3, mask 4.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
# Words of typical video captions (and of the demo dataset's); anything else is <unk>.
WORDS = """
a an the this that these those it its s he she they them his her their him we you i one two three four five
some many few several each every all both other another more most no not only very just also too then than as
of in on at to from by with without into onto over under above below behind between through across along around
near far before after during while when where which who what how and or but so if because up down out off away
back forth forward left right top bottom middle center centre front side edge edges corner inside outside here there
is are was were be been being has have had do does did can could will would should may might must
red orange yellow green blue purple pink brown black white grey gray gold silver cyan magenta violet beige dark
light bright pale colorful colourful colour color colours colors
square squares circle circles ball balls box cube shape shapes line lines dot dots block blocks triangle
background foreground scene frame image picture photo video clip shot view camera screen sky ground floor wall
room window door table chair bed house building street road city town park garden forest tree trees grass flower
flowers field mountain mountains hill river lake sea ocean beach sand water wave waves rock rocks snow rain sun
sunset sunrise moon night day morning evening shadow shadows cloud clouds fire smoke wind
man woman men women person people boy girl child children baby friend friends family crowd face hand hands eyes
hair head body dog dogs cat cats bird birds horse fish animal car cars bus train bike bicycle boat plane
moves move moving slides slide sliding glides glide gliding walks walk walking runs run running jumps jump jumping
flies fly flying falls fall falling rises rise rising drops drop turns turn turning spins spin spinning rolls roll
rolling bounces bounce bouncing comes come coming goes go going travels travel crosses cross reaches reach stops
stop stays stay sits sit sitting stands stand standing looks look looking holds hold holding plays play playing
speaks speak speaking talks talk talking says sings sing singing laughs laugh smiles smile dances dance dancing
pass passes passing barks crash crashes shines shine shining grows grow follows follow following pulses pulse
slow slowly fast quickly quick steady steadily gently softly loud loudly quiet quietly smooth smoothly sudden
suddenly again once twice still calm busy empty full small large big little tiny huge long short high low tall
wide narrow new old young round flat plain simple soft hard warm cold hot wet dry clear beautiful
tone tones sound sounds pitch note notes beat beats music song voice noise hum beep chime
higher lower louder quieter
"""

# Gemma 3's block structure at toy widths: two layers, one sliding-window and one global, as the real one alternates.
_GEMMA_TEXT = dict(
    hidden_size=GEMMA_HIDDEN_SIZE, intermediate_size=48, num_hidden_layers=GEMMA_LAYERS, num_attention_heads=2,
    num_key_value_heads=1, head_dim=8, sliding_window=4, max_position_embeddings=2048,
    layer_types=["sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=1, bos_token_id=2,
)
_SIGLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
               patch_size=14)

# Two heads per connector block, as in tests/test_loading.py's tiny connectors; the head width follows the target.
CONNECTOR_HEADS = 2

# The production upsampling factors (hence sample rates) with narrow channels and one residual kernel per stage.
# Each stage halves the width, so the hidden width must outlast the stages.
_VOCODER_STAGES = dict(resnet_kernel_sizes=[3], resnet_dilations=[[1]])
TINY_VOCODER_CONFIG = {
    "2.0": dict(hidden_channels=32, upsample_kernel_sizes=[16, 15, 8, 4, 4], upsample_factors=[6, 5, 2, 2, 2],
                output_sampling_rate=24000, **_VOCODER_STAGES),
    "2.3": dict(hidden_channels=64, upsample_kernel_sizes=[11, 4, 4, 4, 4, 4], upsample_factors=[5, 2, 2, 2, 2, 2],
                bwe_hidden_channels=32, bwe_upsample_kernel_sizes=[12, 11, 4, 4, 4],
                bwe_upsample_factors=[6, 5, 2, 2, 2], bwe_resnet_kernel_sizes=[3], bwe_resnet_dilations=[[1]],
                input_sampling_rate=16000, output_sampling_rate=48000, **_VOCODER_STAGES),
}


@dataclass
class TinyComponents:
    video_vae: AutoencoderKLLTX2Video
    audio_vae: AutoencoderKLLTX2Audio
    text_encoder: torch.nn.Module  # Gemma3TextModel
    tokenizer: PreTrainedTokenizerFast
    connectors: LTX2TextConnectors


@contextlib.contextmanager
def _seeded(seed: int):
    """Random initialisation from `seed` without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    """These parts are never trained: fp32, eval mode, no gradients."""
    return module.float().eval().requires_grad_(False)


def tiny_video_vae(seed: int = 0) -> AutoencoderKLLTX2Video:
    """[B, 3, 8k+1, H, W] -> latents [B, 128, k+1, H/32, W/32]; statistics drawn so normalisation is not a no-op."""
    with _seeded(seed):
        vae = AutoencoderKLLTX2Video(**VIDEO_VAE_CONFIG)
        vae.latents_mean.copy_(0.1 * torch.randn(vae.config.latent_channels))
        vae.latents_std.copy_(0.5 + torch.rand(vae.config.latent_channels))
    return _frozen(vae)


def tiny_audio_vae(seed: int = 0) -> AutoencoderKLLTX2Audio:
    """Log-mel [B, 2, T, 64] -> latents [B, 8, ceil(T/4), 16]; statistics over the 8 x 16 packed features."""
    with _seeded(seed):
        vae = AutoencoderKLLTX2Audio(**AUDIO_VAE_CONFIG)
        features = vae.latents_mean.numel()
        vae.latents_mean.copy_(0.1 * torch.randn(features))
        vae.latents_std.copy_(0.5 + torch.rand(features))
    return _frozen(vae)


def tiny_tokenizer(add_bos_token: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over `WORDS` with Gemma's special tokens and ids, BOS post-processor and left padding.

    Gemma's own is a SentencePiece BPE that cannot be made offline; what the pipeline depends on is kept: the ids of
    the special tokens, a BOS added by the tokenizer (or not, to test that BOS is forced), padding on the left.
    Lower-cased words and single digits are tokens; punctuation marks are tokens of their own.
    """
    words = WORDS.split() + list("0123456789") + list(".,;:!?'\"()-")
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    pad, eos, bos, unk, mask = SPECIAL_TOKENS
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A" if add_bos_token else "$A", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, eos_token=eos, bos_token=bos, unk_token=unk, mask_token=mask,
        padding_side="left",
    )


def tiny_gemma(vocab_size: int, seed: int = 0) -> Gemma3ForConditionalGeneration:
    """The whole Gemma 3 model as google/gemma-3-12b-it is published (with a toy SigLIP vision tower), for writing
    checkpoints in the published layout; `tiny_text_encoder` takes its language model."""
    config = Gemma3Config(
        text_config=Gemma3TextConfig(vocab_size=vocab_size, **_GEMMA_TEXT).to_dict(),
        vision_config=SiglipVisionConfig(**_SIGLIP).to_dict(),
        mm_tokens_per_image=4,
    )
    with _seeded(seed):
        return _frozen(Gemma3ForConditionalGeneration(config))


def tiny_text_encoder(seed: int = 0):
    """(Gemma 3 language model, tokenizer): what `trainer.models.text.load_text_encoder` returns for the checkpoint
    `tiny_gemma(len(tokenizer), seed)` saved to disk."""
    tokenizer = tiny_tokenizer()
    return tiny_gemma(len(tokenizer), seed).model.language_model, tokenizer


def tiny_connectors(target: ModelTarget, text_encoder: torch.nn.Module, seed: int = 0) -> LTX2TextConnectors:
    """The target version's text connectors, reading all hidden states of `text_encoder` and giving the widths
    the target's transformer takes: LTX-2.3 projects per modality with gated blocks; LTX-2 projects once to the
    text encoder's width, which must then be the target's caption width."""
    gemma = text_encoder.config.get_text_config()
    if target.version == "2.0" and target.video_text_dim != gemma.hidden_size:
        raise ValueError(
            f"LTX-2 connectors keep the text encoder's width ({gemma.hidden_size}), but target {target.name!r} takes "
            f"text embeddings of width {target.video_text_dim}"
        )
    streams = {}
    for stream, width in (("video", target.video_text_dim), ("audio", target.audio_text_dim)):
        if width % CONNECTOR_HEADS:
            raise ValueError(f"no tiny {stream} connector of width {width}: {CONNECTOR_HEADS} heads must share it")
        streams.update({
            f"{stream}_connector_num_attention_heads": CONNECTOR_HEADS,
            f"{stream}_connector_attention_head_dim": width // CONNECTOR_HEADS,
            f"{stream}_connector_num_layers": 2,
            f"{stream}_connector_num_learnable_registers": CONNECTOR_REGISTERS,
            f"{stream}_gated_attn": target.version == "2.3",
        })
    with _seeded(seed):
        connectors = LTX2TextConnectors(
            caption_channels=gemma.hidden_size, text_proj_in_factor=gemma.num_hidden_layers + 1, **streams,
            connector_rope_base_seq_len=4096, rope_theta=10000.0, rope_double_precision=True,
            causal_temporal_positioning=False, rope_type="split", per_modality_projections=target.version == "2.3",
            video_hidden_dim=target.video_text_dim, audio_hidden_dim=target.audio_text_dim,
            proj_bias=target.version == "2.3",
        )
    return _frozen(connectors)


def tiny_vocoder(target: ModelTarget, seed: int = 0) -> LTX2Vocoder | LTX2VocoderWithBWE:
    """Mel [B, 2, T, 64] -> waveform [B, 2, samples] at the target version's production output rate."""
    cls = LTX2VocoderWithBWE if target.version == "2.3" else LTX2Vocoder
    with _seeded(seed):
        return _frozen(cls(**TINY_VOCODER_CONFIG[target.version]))


def build_tiny_components(target: ModelTarget, seed: int = 0) -> TinyComponents:
    """Every part preprocessing needs besides the transformer, frozen, in eval mode and float32 (sampling adds
    `tiny_vocoder`)."""
    text_encoder, tokenizer = tiny_text_encoder(seed)
    return TinyComponents(
        video_vae=tiny_video_vae(seed),
        audio_vae=tiny_audio_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        connectors=tiny_connectors(target, text_encoder, seed),
    )
