"""Grok-1 attention over a paged KV cache (torch; the CPU path and the reference for GPU kernels).

Legend: T tokens in the step, K kv heads held here, G q heads per kv head, Dh head size,
N blocks, S block size, B_d decode sequences, L context length.
The reference's numerics: logits in float32, times attn_output_multiplier, soft-capped as
cap * tanh(logits / cap), masked, float32 softmax, probabilities cast back to the activation dtype.
"""
from __future__ import annotations

import torch

from services.model.attention_metadata import AttentionMetadata


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # k_cache, v_cache: [N, S, K, Dh]; k, v: [T, K, Dh]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            multiplier: float, softcap: float) -> torch.Tensor:
    # q: [B, Tq, K, G, Dh]; k, v: [B, L, K, Dh]; mask: [B, Tq, L] (True = may attend)
    logits = torch.einsum("btkgd,blkd->bkgtl", q.float(), k.float()) * multiplier  # [B, K, G, Tq, L]
    logits = softcap * torch.tanh(logits / softcap)
    # The reference masks with -1e30 rather than -inf: identical once exponentiated, and never NaN.
    logits = logits.masked_fill(~mask[:, None, None], -1e30)
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    return torch.einsum("bkgtl,blkd->btkgd", probs, v)  # [B, Tq, K, G, Dh]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, multiplier: float, softcap: float) -> torch.Tensor:
    """q: [T, K, G, Dh], the step's keys and values already written to the cache. Returns [T, K, G, Dh]."""
    out = torch.empty_like(q)
    num_decode = meta.num_decode
    if num_decode:
        tables = meta.decode_block_tables  # [B_d, M]
        k = k_cache[tables].flatten(1, 2)  # [B_d, M * S, K, Dh]
        v = v_cache[tables].flatten(1, 2)
        span = torch.arange(k.shape[1], device=q.device)
        mask = (span[None, :] < meta.decode_context_lens[:, None])[:, None, :]  # [B_d, 1, M * S]
        out[:num_decode] = _attend(q[:num_decode, None], k, v, mask, multiplier, softcap)[:, 0]
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        L = chunk.context_len
        k = k_cache[chunk.block_table].flatten(0, 1)[:L]  # [L, K, Dh]
        v = v_cache[chunk.block_table].flatten(0, 1)[:L]
        query_pos = torch.arange(L - chunk.query_len, L, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] <= query_pos[:, None]  # [Tq, L], causal
        out[rows] = _attend(q[None, rows], k[None], v[None], mask[None], multiplier, softcap)[0]
    return out
