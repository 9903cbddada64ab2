"""The MoE layer on CPU with torch ops: a loop over only the experts that received tokens.

float32 GEMMs go to oneDNN's inner product where it is faster than MKL (see float32_mm). bfloat16
has no native support on AVX2 and torch has fast kernels for it only for some shapes and layouts,
so the path depends on how a weight is stored:
- stored [out, in] (a transposed view passed as [in, out], the layout of nn.Linear), few rows:
  torch's dot-product kernels (vectorized, float32 accumulation, one rounding);
- stored [in, out] (the checkpoint's layout), one row: torch.mv, whose kernel is vectorized and
  accumulates in float32; torch's bfloat16 matmul would take a scalar fallback, tens of times slower;
- otherwise (more rows, int8, mixed dtypes): the weight is widened to float32 one cache-sized tile
  at a time, each tile consumed by a float32 GEMM before the next is made. DRAM sees each weight
  byte once, in its stored width.
"""
from __future__ import annotations

import torch

from .cpu_packing import ONEDNN_AVAILABLE, onednn_linear, packed_matmul
from .expert_weights import ExpertWeights
from .moe_inputs import check_moe_inputs
from .reference import gelu_tanh, softmax_topk

# Legend: T = tokens, K = top_k, S = T * K slots, E = experts (global), L = local experts, D = hidden,
# F = ffn, R = scale row blocks, n = slots of one expert; a weight is [K_in, N_out] ("rows, cols").

# float32 bytes of one widened weight tile: large enough that per-tile op overhead is small next to
# its GEMM, small enough to stay in L3 between the widening and the GEMM that reads it. Measured on
# the cpu-bench shape: 4 MiB tiles beat 256 KiB ones by 3x at 4 to 16 rows.
_TILE_BYTES = 4 << 20
# Columns of a widened tile when whole rows do not fit: rows of [in, out] storage are read in runs
# this long. And the fewest rows of a tile: fewer make the GEMM on it inefficient.
_TILE_COLS = 512
_MIN_TILE_ROWS = 256
# Longest K for which oneDNN beats MKL on [in, out] storage.
_ONEDNN_MAX_K_IN_OUT = 8192
# Rows up to which torch's bfloat16 dot-product kernels beat widening to float32: their cost grows
# with every row (each converts the whole weight again), widening pays the conversion once.
_DOT_KERNEL_MAX_ROWS = 5



def stored_transposed(weight: torch.Tensor) -> bool:
    """True for a [K, N] view of [N, K] storage (nn.Linear's layout): columns are contiguous."""
    return weight.stride(0) == 1 and weight.shape[1] > 1


def float32_mm(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """a float32 [n, K] @ weight float32 [K, N], either storage order."""
    # oneDNN reads [out, in] storage natively and won at every size measured (2x at 4 to 16 rows).
    # Given [in, out] storage it wins up to K = 6144 too, but at K = 32768 it is up to 2.7x slower
    # than MKL.
    # oneDNN's inner product (float32 only on AVX2). MKL's sgemm takes a generic path on AMD CPUs.
    if ONEDNN_AVAILABLE and (stored_transposed(weight) or weight.shape[0] <= _ONEDNN_MAX_K_IN_OUT):
        return onednn_linear(a, weight.t())
    return a @ weight


def _widen_tile(out: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
                act_dtype: torch.dtype) -> None:
    """out float32 [k, c] <- weight [k, c] as kernels.reference.dequantize: int8 dequantized in
    float32 (scales [b, c], one row per k / b weight rows), exact and not rounded, as the W8A16 GPU
    kernels compute it; a float weight rounded to act_dtype."""
    out.copy_(weight)
    if scales is not None:
        blocks = scales.shape[0]
        out.view(blocks, out.shape[0] // blocks, out.shape[1]).mul_(scales.float()[:, None, :])
    elif act_dtype != torch.float32 and weight.dtype != act_dtype:
        out.copy_(out.to(act_dtype))


def _widened_matmul(a: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None,
                    act_dtype: torch.dtype) -> torch.Tensor:
    """a float32 [n, K] @ weight [K, N] (scales [R, N]), widened to float32 one tile at a time."""
    rows, cols = weight.shape
    rows_per_scale = rows if scales is None else rows // scales.shape[0]
    # Tiles are runs of the weight's storage, so widening is a straight copy and the GEMM gets a deep
    # K: [out, in] storage gives strips of whole columns; [in, out] storage strips of whole rows,
    # or of _TILE_COLS columns when rows are too long for that (Grok-1's 65536-wide w13).
    if stored_transposed(weight):
        tile_rows, tile_cols = rows, min(cols, max(8, _TILE_BYTES // (4 * rows)))
    else:
        tile_cols = cols if 4 * cols * _MIN_TILE_ROWS <= _TILE_BYTES else min(cols, _TILE_COLS)
        tile_rows = min(rows, max(_MIN_TILE_ROWS, _TILE_BYTES // (4 * tile_cols)))
    if scales is not None and rows_per_scale <= tile_rows:
        tile_rows = tile_rows // rows_per_scale * rows_per_scale  # whole scale row blocks
    elif scales is not None:
        tile_rows = next(d for d in range(tile_rows, 0, -1) if rows_per_scale % d == 0)  # inside one
    if stored_transposed(weight):
        buf = torch.empty(tile_cols, tile_rows).t()
    else:
        buf = torch.empty(tile_rows, tile_cols)
    out = torch.zeros(a.shape[0], cols, dtype=torch.float32)
    for n0 in range(0, cols, tile_cols):
        n1 = min(cols, n0 + tile_cols)
        for k0 in range(0, rows, tile_rows):
            k1 = min(rows, k0 + tile_rows)
            tile = buf[: k1 - k0, : n1 - n0]
            tile_scales = None if scales is None else scales[k0 // rows_per_scale:(k1 - 1) // rows_per_scale + 1, n0:n1]
            _widen_tile(tile, weight[k0:k1, n0:n1], tile_scales, act_dtype)
            out[:, n0:n1].add_(float32_mm(a[:, k0:k1], tile))
    return out


def matmul_weight(a: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """a [n, K] in the activation dtype @ weight [K, N] (any stored dtype and order, int8 with scales
    [R, N]) -> float32 [n, N], with kernels.reference's numerics (float weights rounded to a's dtype, int8 ones exact)."""
    act_dtype = a.dtype
    if weight.dtype == torch.float32 and act_dtype == torch.float32:
        return float32_mm(a, weight)
    if scales is None and weight.dtype == act_dtype == torch.bfloat16:
        if stored_transposed(weight):
            if a.shape[0] <= _DOT_KERNEL_MAX_ROWS:
                return (a @ weight).float()
        elif a.shape[0] == 1:
            return torch.mv(weight.t(), a[0]).float()[None]
    return _widened_matmul(a.float(), weight, scales, act_dtype)


def expert_mlp(x: torch.Tensor, experts: ExpertWeights, e: int) -> torch.Tensor:
    """x [n, D] -> float32 [n, D]: (gelu_tanh(x @ linear) * (x @ linear_v)) @ linear_1 of local expert e."""
    ffn = experts.ffn_size
    if experts.packed13 is not None and x.dtype == experts.w13.dtype == torch.float32 and x.shape[0] > 1:
        ab = packed_matmul(x, experts.packed13[e])  # [n, 2F]
        return packed_matmul(gelu_tanh(ab[:, :ffn]).mul_(ab[:, ffn:]), experts.packed2[e])
    if experts.packed13 is not None and x.dtype == experts.w13.dtype == torch.bfloat16:
        # Rounded once to bfloat16 like the dot-product path below, then widened: same numerics.
        ab = packed_matmul(x, experts.packed13[e]).float()  # [n, 2F]
        h = gelu_tanh(ab[:, :ffn]).mul_(ab[:, ffn:]).to(x.dtype)  # [n, F]
        return packed_matmul(h, experts.packed2[e]).float()
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
    else:
        for e, slots in work:
            tokens = slots // top_k
            y = expert_mlp(x.index_select(0, tokens), experts, e)  # [n, D]
            out.index_add_(0, tokens, y.mul_(flat_gates.index_select(0, slots)[:, None]))
    return out if x.dtype == torch.float32 else out.to(x.dtype)
