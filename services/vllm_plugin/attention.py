"""Grok-1's attention block on vLLM's attention layer (vLLM's paged KV cache and kernels).

Legend: T tokens, Hq/K q/kv heads, Dh key_size, P the head size handed to vLLM (Dh padded).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.model.grok1 import MultiHeadAttention, RotaryEmbedding


def padded_head_size(key_size: int, supported: list[int] | None) -> int:
    """The smallest head size the attention backend runs that holds key_size. Zero padding is exact:
    padded q and k entries add 0 to every q.k, padded v entries produce output columns that are cut."""
    if not supported or key_size in supported:
        return key_size
    larger = [size for size in supported if size > key_size]
    if not larger:
        raise ValueError(f"key_size {key_size} exceeds every head size the attention backend supports "
                         f"({supported})")
    return min(larger)


class VllmMultiHeadAttention(nn.Module):
    """Keeps the release's submodules (query, key, value, linear) and hands the paged part to vLLM's
    Attention, which applies the scale (attn_output_multiplier) and the soft-cap (30 tanh(s / 30))."""

    def __init__(self, block: MultiHeadAttention, attn: nn.Module, head_size: int):
        super().__init__()
        self.query, self.key, self.value, self.linear = block.query, block.key, block.value, block.linear
        self.num_q_heads, self.num_kv_heads, self.key_size = block.num_q_heads, block.num_kv_heads, block.key_size
        self.pad = head_size - block.key_size
        self.attn = attn

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, *_unused) -> torch.Tensor:
        T, Dh = x.shape[0], self.key_size
        q = rope(self.query(x).view(T, self.num_q_heads, Dh), positions)  # [T, Hq, Dh]
        k = rope(self.key(x).view(T, self.num_kv_heads, Dh), positions)  # [T, K, Dh]
        v = self.value(x).view(T, self.num_kv_heads, Dh)
        if self.pad:
            q, k, v = (F.pad(t, (0, self.pad)) for t in (q, k, v))  # [T, H, P]
        out = self.attn(q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1))  # [T, Hq * P]
        if self.pad:
            out = out.view(T, self.num_q_heads, Dh + self.pad)[..., :Dh]
        return self.linear(out.reshape(T, self.num_q_heads * Dh))  # [T, D]
