"""Grok-1 attention over a paged KV cache (torch; the CPU path and the reference for GPU kernels).

Legend: T tokens in the step, K kv heads held here, G q heads per kv head, Dh head size,
N blocks, S block size, B_d decode sequences, M blocks of the longest decode, L context length,
Tq query rows of a prefill chunk.
The reference's numerics: logits in float32, times attn_output_multiplier, soft-capped as
cap * tanh(logits / cap), masked, float32 softmax, probabilities cast back to the activation dtype.

The cache is head-major, [K, N, S, Dh] per layer: gathering a batch's blocks then gives [K, B, L, Dh]
with each head's keys contiguous, which batched matmuls read as they are. With the token-major
layout [N, S, K, Dh] the gathered keys needed a transposing copy, and a decode step of 32 sequences
spent most of its attention time in those copies (docs/benchmarks.md).
"""
from __future__ import annotations

import ctypes
import functools
import math

import torch

from kernels.native import library
from services.model.attention_metadata import AttentionMetadata

# Query rows of a prefill chunk attended at once: bounds the [K, G, rows, L] float32 logits to a
# few MiB, so long prompts neither hold a huge temporary nor fault it in afresh for every layer.
PREFILL_QUERY_ROWS = 256


class AttentionWorkspace:
    """Gather buffers reused by every layer and step. A fresh tensor of several MiB per layer would be
    mapped and page-faulted anew each time (the allocator returns large blocks to the OS on free);
    copying into memory already touched runs at copy bandwidth."""

    def __init__(self):
        self._buffers: dict[int, torch.Tensor] = {}

    def take(self, slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[slot] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # k_cache, v_cache: [K, N, S, Dh]; k, v: [T, K, Dh]
    heads, dh = k_cache.shape[0], k_cache.shape[-1]
    k_cache.view(heads, -1, dh).index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.view(heads, -1, dh).index_copy_(1, slot_mapping, v.transpose(0, 1))


def _gather(cache: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """cache [K, N, S, Dh], blocks [b] -> out [K, b, S, Dh] (the blocks' rows, per head)."""
    heads, n, s, dh = cache.shape
    return torch.index_select(cache.view(heads, n, s * dh), 1, blocks, out=out.view(heads, -1, s * dh))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            multiplier: float, softcap: float) -> torch.Tensor:
    # q: [K, B, Tq, Dh] (B batches of Tq rows; a kv head's G q heads are folded into Tq);
    # k, v: [K, B, L, Dh]; mask: broadcastable to [K, B, Tq, L] (True = may attend)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(multiplier)  # [K, B, Tq, L]
    return torch.matmul(_probabilities(logits, mask, softcap, v.dtype), v)  # [K, B, Tq, Dh]


def _probabilities(logits: torch.Tensor, mask: torch.Tensor, softcap: float, dtype: torch.dtype) -> torch.Tensor:
    """float32 logits (overwritten) -> soft-capped, masked softmax in `dtype`; mask True = may attend."""
    logits = logits.div_(softcap).tanh_().mul_(softcap)
    # The reference masks with -1e30 rather than -inf: identical once exponentiated, and never NaN.
    logits.masked_fill_(~mask, -1e30)
    return torch.softmax(logits, dim=-1).to(dtype)


_NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


@functools.cache
def _native_decode():
    lib = library("decode_attention")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.decode_attention_max_row.restype = i64
    lib.decode_attention_logits.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, *[i64] * 8, ctypes.c_float]
    lib.decode_attention_values.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, *[i64] * 8]
    lib.max_row = lib.decode_attention_max_row()  # asked once, not per layer
    return lib


def _decode_attention_native(lib, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             tables: torch.Tensor, context_lens: torch.Tensor, multiplier: float,
                             softcap: float, workspace: AttentionWorkspace) -> torch.Tensor:
    """q [B_d, K, G, Dh] -> [B_d, K, G, Dh] with kernels/csrc/decode_attention.cpp reading the cache where
    it lies; the soft-cap, mask and softmax stay here, as _attend computes them."""
    B, heads, groups, dh = q.shape
    _, n, s, _ = k_cache.shape
    m = tables.shape[1]
    width = m * s
    dtype = _NATIVE_DTYPES[q.dtype]
    q = q.contiguous()
    tables = tables.contiguous()
    context_lens = context_lens.contiguous()
    logits = workspace.take(2, (B, heads, groups, width), torch.empty(0))  # [B, K, G, W] float32
    lib.decode_attention_logits(dtype, q.data_ptr(), k_cache.data_ptr(), tables.data_ptr(), context_lens.data_ptr(),
                                logits.data_ptr(), B, heads, groups, dh, n, s, m, width, multiplier)
    mask = torch.arange(width)[None, :] < context_lens[:, None]  # [B, W]
    probs = _probabilities(logits, mask[:, None, None, :], softcap, q.dtype)  # [B, K, G, W]
    out = torch.empty_like(q)
    lib.decode_attention_values(dtype, probs.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), context_lens.data_ptr(),
                                out.data_ptr(), B, heads, groups, dh, n, s, m, width)
    return out


def _native_applies(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> bool:
    return (q.device.type == "cpu" and q.dtype in _NATIVE_DTYPES and k_cache.dtype == v_cache.dtype == q.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and meta.decode_block_tables.dtype == meta.decode_context_lens.dtype == torch.int64)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, multiplier: float, softcap: float,
                    workspace: AttentionWorkspace | None = None) -> torch.Tensor:
    """q: [T, K, G, Dh], the step's keys and values already written to the cache. Returns [T, K, G, Dh]."""
    workspace = workspace or AttentionWorkspace()
    out = torch.empty_like(q)
    heads, _, block_size, dh = k_cache.shape
    groups = q.shape[2]
    num_decode = meta.num_decode
    lib = _native_decode() if num_decode and _native_applies(q, k_cache, v_cache, meta) else None
    if lib is not None and groups * dh <= lib.max_row:
        out[:num_decode] = _decode_attention_native(lib, q[:num_decode], k_cache, v_cache, meta.decode_block_tables,
                                                    meta.decode_context_lens, multiplier, softcap, workspace)
    elif num_decode:
        tables = meta.decode_block_tables  # [B_d, M]
        width = tables.shape[1] * block_size
        shape = (heads, num_decode, width, dh)
        k = _gather(k_cache, tables.reshape(-1), workspace.take(0, shape, k_cache)).view(shape)
        v = _gather(v_cache, tables.reshape(-1), workspace.take(1, shape, v_cache)).view(shape)
        mask = torch.arange(width, device=q.device)[None, :] < meta.decode_context_lens[:, None]  # [B_d, M*S]
        qd = q[:num_decode].permute(1, 0, 2, 3)  # [K, B_d, G, Dh]
        out[:num_decode] = _attend(qd, k, v, mask[None, :, None, :], multiplier, softcap).permute(1, 0, 2, 3)
    for chunk in meta.prefills:
        L = chunk.context_len
        blocks = chunk.block_table
        shape = (heads, 1, blocks.shape[0] * block_size, dh)
        k = _gather(k_cache, blocks, workspace.take(0, shape, k_cache)).view(shape)[:, :, :L]  # [K, 1, L, Dh]
        v = _gather(v_cache, blocks, workspace.take(1, shape, v_cache)).view(shape)[:, :, :L]
        keys = torch.arange(L, device=q.device)
        for r0 in range(0, chunk.query_len, PREFILL_QUERY_ROWS):
            r1 = min(chunk.query_len, r0 + PREFILL_QUERY_ROWS)
            rows = slice(chunk.query_start + r0, chunk.query_start + r1)
            # Causal: no row of this block sees past its last row's position, so the keys beyond it
            # are left out rather than computed and masked (half the work of a whole-prompt prefill).
            seen = L - chunk.query_len + r1
            query_pos = torch.arange(seen - (r1 - r0), seen, device=q.device)
            mask = keys[None, :seen] <= query_pos[:, None]  # [rows, seen]
            qp = q[rows].permute(1, 2, 0, 3).reshape(heads, 1, groups * (r1 - r0), dh)  # [K, 1, G*rows, Dh]
            mask = mask.repeat(groups, 1)  # [G*rows, seen], rows of each q head in turn
            att = _attend(qp, k[:, :, :seen], v[:, :, :seen], mask, multiplier, softcap)  # [K, 1, G*rows, Dh]
            out[rows] = att.view(heads, groups, r1 - r0, dh).permute(2, 0, 1, 3)
    return out
