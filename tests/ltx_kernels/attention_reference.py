"""Plain-PyTorch reference of ltx_kernels.attention.fused_attention: the same signature and semantics, computed in the
inputs' dtype (pass float64 tensors for a reference the kernels are measured against)."""

import torch


def rotate_split(x: torch.Tensor, rope, heads: int) -> torch.Tensor:
    """diffusers' apply_split_rotary_emb on [B, N, H*D] with (cos, sin) of shape [B, H, N, D/2], in x's dtype."""
    cos, sin = (t.to(x.dtype) for t in rope)
    b, n, _ = x.shape
    x = x.reshape(b, n, heads, 2, -1).transpose(1, 2)  # [B, H, N, 2, D/2]
    x1, x2 = x[..., 0, :], x[..., 1, :]
    out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-2)
    return out.transpose(1, 2).reshape(b, n, -1)


def reference_attention(q, k, v, *, q_rope=None, k_rope=None, gate_logits=None, key_bias=None, heads):
    """softmax(rope(q) rope(k)^T / sqrt(D) + key_bias) v, times 2*sigmoid(gate_logits) per head."""
    b, nq, width = q.shape
    nk = k.shape[1]
    d = width // heads
    if q_rope is not None:
        q = rotate_split(q, q_rope, heads)
    if k_rope is not None:
        k = rotate_split(k, k_rope, heads)
    qh = q.reshape(b, nq, heads, d).transpose(1, 2)
    kh = k.reshape(b, nk, heads, d).transpose(1, 2)
    vh = v.reshape(b, nk, heads, d).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) / d**0.5
    if key_bias is not None:
        scores = scores + key_bias.to(scores.dtype).expand(b, nk)[:, None, None, :]
    out = torch.softmax(scores, dim=-1) @ vh  # [B, H, Nq, D]
    if gate_logits is not None:
        out = out * (2 * torch.sigmoid(gate_logits.to(out.dtype))).transpose(1, 2)[..., None]
    return out.transpose(1, 2).reshape(b, nq, width)
