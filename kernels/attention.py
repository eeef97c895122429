"""Attention dispatch: torch's `scaled_dot_product_attention`, except where an explicit softmax(QK^T/sqrt(d))V is
measured faster.

That place is the CPU in bfloat16 (inputs in bf16, or autocast on) at short sequences, where torch's fused CPU
kernel is slow in its backward (the training loops' speed in `multimodal bench train` includes it). The scores
[B, H, T, S] are materialised, so only sequences up to `EXPLICIT_MAX_TOKENS` take it. The softmax runs in float32
either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EXPLICIT_MAX_TOKENS = 512


def use_explicit(q: torch.Tensor, k: torch.Tensor) -> bool:
    """The explicit path: CPU, bf16 (or CPU autocast), both sequence lengths at most EXPLICIT_MAX_TOKENS."""
    if q.device.type != "cpu" or max(q.shape[-2], k.shape[-2]) > EXPLICIT_MAX_TOKENS:
        return False
    return q.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                       is_causal: bool = False) -> torch.Tensor:
    """q [B, H, T, D], k and v [B, G, S, D] with G dividing H (grouped-query attention), attn_mask bool (True =
    attend) broadcastable to [B, H, T, S] -> [B, H, T, D]; as SDPA computes it, in q's compute dtype."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)  # [B, H, S, D]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, T, S]
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(dtype) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=..., enable_gqa=True)` (bool masks only),
    through the faster path for these inputs."""
    if use_explicit(q, k):
        return explicit_attention(q, k, v, attn_mask, is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          enable_gqa=k.shape[1] != q.shape[1])
