"""The MoE layer on CPU with torch ops: a loop over only the experts that received tokens.

CPU GEMMs are fast here only in float32 (AVX2, no native bfloat16): torch's bfloat16 matmul with
the checkpoint's [in, out] layout takes a scalar fallback, tens of times slower than float32. Two
ways around it, both streaming each weight byte from DRAM once, in its stored width:
- one token on an expert: torch.mv on the transposed view, whose bfloat16 kernel is vectorized and
  accumulates in float32 (it rounds once, to bfloat16);
- more tokens: the weight is widened to float32 in row chunks that stay in cache, each chunk
  consumed by an addmm before the next is made.
"""
from __future__ import annotations

import torch

from .expert_weights import ExpertWeights
from .moe_inputs import check_moe_inputs
from .reference import gelu_tanh, softmax_topk

# Legend: T = tokens, K = top_k, S = T * K slots, E = experts (global), L = local experts, D = hidden,
# F = ffn, N = a weight's output columns, R = scale row blocks, n = slots of one expert.

# float32 bytes of one widened weight chunk: large enough that per-chunk op overhead is small next
# to its GEMM, small enough to stay in L2 between the widening and the addmm that reads it.
_CHUNK_BYTES = 1 << 20


def _widen_chunk(out: torch.Tensor, weight: torch.Tensor, scale_row: torch.Tensor | None,
                 act_dtype: torch.dtype) -> None:
    """out (float32) <- the reference's weight numerics: dequantize in float32, round to act_dtype."""
    if scale_row is not None:
        out.copy_(weight)
        out.mul_(scale_row)
        if act_dtype != torch.float32:
            out.copy_(out.to(act_dtype))
    elif weight.dtype == act_dtype or act_dtype == torch.float32:
        out.copy_(weight)  # exact
    else:
        out.copy_(weight.to(act_dtype))


def matmul_weight(a: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """a [n, K] in the activation dtype @ weight [K, N] (any stored dtype, int8 with scales [R, N])
    -> float32 [n, N], with the reference's numerics (weights rounded to a's dtype)."""
    act_dtype = a.dtype
    if weight.dtype == torch.float32 and act_dtype == torch.float32:
        return a @ weight
    if a.shape[0] == 1 and scales is None and weight.dtype == act_dtype == torch.bfloat16:
        return torch.mv(weight.t(), a[0]).float()[None]
    rows, cols = weight.shape
    rows_per_scale = rows if scales is None else rows // scales.shape[0]
    chunk_rows = max(8, min(rows, _CHUNK_BYTES // (4 * cols)))
    a = a.float()
    out = torch.zeros(a.shape[0], cols, dtype=torch.float32)
    buf = torch.empty(chunk_rows, cols, dtype=torch.float32)
    k0 = 0
    while k0 < rows:
        # Chunks never straddle a scale row block, so one scale row serves the whole chunk.
        k1 = min(k0 + chunk_rows, rows, (k0 // rows_per_scale + 1) * rows_per_scale)
        chunk = buf[: k1 - k0]
        scale_row = None if scales is None else scales[k0 // rows_per_scale].float()
        _widen_chunk(chunk, weight[k0:k1], scale_row, act_dtype)
        out.addmm_(a[:, k0:k1], chunk)
        k0 = k1
    return out


def expert_mlp(x: torch.Tensor, experts: ExpertWeights, e: int) -> torch.Tensor:
    """x [n, D] -> float32 [n, D]: (gelu_tanh(x @ linear) * (x @ linear_v)) @ linear_1 of local expert e."""
    ffn = experts.ffn_size
    scales13 = None if experts.w13_scales is None else experts.w13_scales[e]
    ab = matmul_weight(x, experts.w13[e], scales13)  # [n, 2F] float32
    h = gelu_tanh(ab[:, :ffn]).mul_(ab[:, ffn:]).to(x.dtype)  # [n, F], GEMM 2 reads it in x's dtype
    scales2 = None if experts.w2_scales is None else experts.w2_scales[e]
    return matmul_weight(h, experts.w2[e], scales2)


def _slots_by_expert(local: torch.Tensor, num_local: int, one_token: bool):
    """(local expert, its slots [n]) for each expert that received slots; local [S], -1 = not held."""
    if one_token:
        # A token's top-k experts are distinct; a sort costs more than this whole routing.
        for slot, e in enumerate(local.tolist()):
            if e >= 0:
                yield e, slot
        return
    order = torch.argsort(local, stable=True)  # [S] slots by local expert, unheld ones first
    counts = torch.bincount(local + 1, minlength=num_local + 1).tolist()
    start = counts[0]
    for e, n in enumerate(counts[1:]):
        if n:
            yield e, order[start:start + n]
            start += n


def _grouped_mm_applies(experts: ExpertWeights, x: torch.Tensor) -> bool:
    # torch._grouped_mm has a fast CPU kernel for float32 only (bfloat16 takes the scalar fallback).
    return hasattr(torch, "_grouped_mm") and x.dtype == experts.w13.dtype == experts.w2.dtype == torch.float32


def _grouped_float32_experts(x: torch.Tensor, experts: ExpertWeights, work: list, flat_gates: torch.Tensor,
                             top_k: int, out: torch.Tensor) -> None:
    """All experts in two grouped GEMMs over the slots sorted by expert: one gather, one activation,
    one scatter, and torch spreads the groups over its threads instead of splitting each small GEMM."""
    if not work:
        return
    counts = torch.zeros(experts.num_experts, dtype=torch.int64)
    for e, slots in work:
        counts[e] = slots.numel()
    slots = torch.cat([slots for _, slots in work])  # [n] by expert
    tokens = slots // top_k
    ends = torch.cumsum(counts, 0).to(torch.int32)  # [L] group ends; empty groups allowed
    ab = torch._grouped_mm(x.index_select(0, tokens), experts.w13, offs=ends)  # [n, 2F]
    ffn = experts.ffn_size
    h = gelu_tanh(ab[:, :ffn]).mul_(ab[:, ffn:])  # [n, F]
    y = torch._grouped_mm(h, experts.w2, offs=ends)  # [n, D]
    out.index_add_(0, tokens, y.mul_(flat_gates.index_select(0, slots)[:, None]))


def fused_moe_cpu(x: torch.Tensor, router_logits: torch.Tensor, experts: ExpertWeights, top_k: int,
                  expert_map: torch.Tensor | None = None,
                  expert_counts_out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as kernels.dispatch.fused_moe. Syncs freely: on CPU there is no device to wait on."""
    check_moe_inputs(x, router_logits, experts, top_k, expert_map, expert_counts_out)
    num_tokens, num_experts = router_logits.shape
    gates, ids = softmax_topk(router_logits, top_k)  # [T, K], [T, K]
    flat_ids = ids.view(-1).long()  # [S]
    if expert_counts_out is not None:
        expert_counts_out += torch.bincount(flat_ids, minlength=num_experts)
    local = flat_ids if expert_map is None else expert_map.long()[flat_ids]  # [S], -1 = not held
    out = torch.zeros(num_tokens, experts.hidden_size, dtype=torch.float32)  # [T, D]
    if num_tokens == 0:
        return out.to(x.dtype)
    flat_gates = gates.view(-1)  # [S]
    work = list(_slots_by_expert(local, experts.num_experts, num_tokens == 1))
    if num_tokens == 1:
        for e, slot in work:  # no gather or scatter: the row is the token
            out.add_(expert_mlp(x, experts, e).mul_(flat_gates[slot]))
    elif _grouped_mm_applies(experts, x):
        _grouped_float32_experts(x, experts, work, flat_gates, top_k, out)
    else:
        for e, slots in work:
            tokens = slots // top_k
            y = expert_mlp(x.index_select(0, tokens), experts, e)  # [n, D]
            out.index_add_(0, tokens, y.mul_(flat_gates.index_select(0, slots)[:, None]))
    return out if x.dtype == torch.float32 else out.to(x.dtype)
