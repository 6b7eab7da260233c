"""Swaps ltx-lora's fused kernels into a diffusers LTX-2 transformer and back (each swap is switched by config).

`install_attention` gives every `LTX2Attention` a `FusedLTX2AttnProcessor`: the projections (LoRA-wrapped Linear
modules, called as modules), the q/k RMSNorms and the output projection stay the module's own; the attention
itself, with its RoPE, key padding bias and per-head gate, runs in ltx_kernels.attention.fused_attention. Calls the
kernel cannot serve exactly (STG perturbation, a full [Nq, Nk] mask, interleaved RoPE, CPU tensors outside Triton's
interpreter) go to the module's original diffusers processor.
"""

from __future__ import annotations

import inspect
import os

import torch

from ltx_kernels.attention import fused_attention


def _kernel_device(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _key_bias(mask: torch.Tensor, batch: int, keys: int) -> torch.Tensor | None:
    """The [B, Nk] additive key bias of an attention mask the processor receives, or None when the mask is not a
    per-key bias. The model turns its text mask into a [B, 1, Nk] bias (0 keep, -10000 drop) and the diffusers
    processor adds it to the scores of every head and query; a [B, Nk] mask is used the same way."""
    if mask.dim() == 3 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() == 2 and mask.shape[1] == keys and mask.shape[0] in (1, batch) and mask.is_floating_point():
        return mask
    return None


class FusedLTX2AttnProcessor:
    """LTX-2 attention through the fused Triton kernel; same call signature as diffusers' LTX-2 processors."""

    def __init__(self, original):
        self.original = original
        self._original_params = set(inspect.signature(original.__call__).parameters)

    def _fallback(self, attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                  key_rotary_emb, **perturbation):
        kwargs = {k: v for k, v in perturbation.items() if v is not None and k in self._original_params}
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                             key_rotary_emb, **kwargs)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, query_rotary_emb=None, key_rotary_emb=None,
                 perturbation_mask: torch.Tensor | None = None, all_perturbed=None) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key_bias = None
        if attention_mask is not None:
            key_bias = _key_bias(attention_mask, hidden_states.shape[0], context.shape[1])
        perturbed = perturbation_mask is not None or (all_perturbed is not None and all_perturbed is not False)
        split_rope = query_rotary_emb is None or (attn.rope_type == "split" and query_rotary_emb[0].dim() == 4)
        if (perturbed or not split_rope or (attention_mask is not None and key_bias is None)
                or not _kernel_device(hidden_states)):
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                                  key_rotary_emb, perturbation_mask=perturbation_mask, all_perturbed=all_perturbed)

        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        value = attn.to_v(context)
        # Under bf16 autocast (Accelerate's mixed precision) the RMSNorms return fp32 while the projections return
        # bf16; SDPA would cast all three to bf16, so does this.
        query = attn.norm_q(attn.to_q(hidden_states)).to(value.dtype)
        key = attn.norm_k(attn.to_k(context)).to(value.dtype)
        q_rope = k_rope = None
        if query_rotary_emb is not None:
            q_rope = query_rotary_emb
            k_rope = key_rotary_emb if key_rotary_emb is not None else query_rotary_emb
        out = fused_attention(query, key, value, q_rope=q_rope, k_rope=k_rope, gate_logits=gate_logits,
                              key_bias=key_bias, heads=attn.heads)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _attention_modules(model: torch.nn.Module):
    from diffusers.models.transformers.transformer_ltx2 import LTX2Attention

    return [m for m in model.modules() if isinstance(m, LTX2Attention)]


def install_attention(model: torch.nn.Module) -> int:
    """Gives every LTX2Attention of `model` the fused processor; returns how many were replaced (installing twice
    replaces nothing the second time)."""
    count = 0
    for module in _attention_modules(model):
        if not isinstance(module.processor, FusedLTX2AttnProcessor):
            module.set_processor(FusedLTX2AttnProcessor(module.processor))
            count += 1
    return count


def uninstall_attention(model: torch.nn.Module) -> int:
    """Puts back the diffusers processors install_attention replaced; returns how many were restored."""
    count = 0
    for module in _attention_modules(model):
        if isinstance(module.processor, FusedLTX2AttnProcessor):
            module.set_processor(module.processor.original)
            count += 1
    return count
