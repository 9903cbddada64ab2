"""Grouped GEMM 2: out[t] += gate(s) * (h[s] @ linear_1) over the sorted slots, back in token order.

Each program adds its float32 tile straight into the [T, D] output with atomics, so the top-k
partial rows are never written out and summed in a second pass. With top_k = 2 and split_k = 1 each
element receives exactly two adds onto zero, and float addition commutes: the result is
deterministic. split_k > 1 trades that for more programs when few experts stream a long K.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .routing import Routing
from .tile_config import GemmTiles
from .triton_launch import DotPlan, check_device
from .triton_tiles import grouped_pid, load_activation_tile, load_weight_tile, scale_mode, scale_row

# Legend: T = tokens, S = slots, F = ffn (K of this GEMM), D = hidden (N), L = local experts, R = scale rows.


@triton.jit
def _down_k_range(acc, h_base, w_base, s_ptr, k_lo, k_hi, slot_valid, offs_k, offs_n, n_valid, stride_hf,
                  stride_wk, stride_sr, stride_sn, rows_per_scale, ACT_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
                  SCALES: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += h[:, k_lo:k_hi] @ weight rows k_lo..k_hi (unscaled int8)."""
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_rows = k0 + offs_k
        k_valid = k_rows < k_hi
        a = load_activation_tile(h_base + k0 * stride_hf, slot_valid, k_valid, DOT_FP32)
        w = load_weight_tile(w_base + k0 * stride_wk, s_ptr, k_rows, offs_n, k_valid, n_valid, stride_sr, stride_sn,
                             rows_per_scale, ACT_DTYPE, SCALES, DOT_FP32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, s_ptr, out_ptr, gates_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_slots, ffn, hidden, capacity, rows_per_scale,
    stride_hs, stride_hf, stride_we, stride_wk, stride_wn, stride_se, stride_sr, stride_sn,
    stride_ot, stride_od,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, SCALES: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_pid(tl.program_id(0), tl.cdiv(capacity, BLOCK_M), tl.cdiv(hidden, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return

    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    slot_valid = slots < num_slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < hidden
    # This program's share of K, in whole BLOCK_K tiles.
    k_span = tl.cdiv(tl.cdiv(ffn, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * k_span
    k_end = tl.minimum(ffn, k_begin + k_span)
    offs_k = tl.arange(0, BLOCK_K)

    h_base = h_ptr + slots[:, None].to(tl.int64) * stride_hs + offs_k[None, :] * stride_hf
    w_base = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    s_expert_ptr = s_ptr + expert * stride_se
    act_dtype = h_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SCALES == "row_blocks":
        # linear_1's scales are row-blocked: one float32 partial sum per block this program's K
        # range touches, scaled as it is added.
        for block in range(k_begin // rows_per_scale, tl.cdiv(k_end, rows_per_scale)):
            k_lo = tl.maximum(k_begin, block * rows_per_scale)
            part = _down_k_range(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), h_base, w_base, s_expert_ptr,
                                 k_lo, tl.minimum(k_end, (block + 1) * rows_per_scale), slot_valid, offs_k, offs_n,
                                 n_valid, stride_hf, stride_wk, stride_sr, stride_sn, rows_per_scale, act_dtype,
                                 BLOCK_K, SCALES, DOT_FP32, DOT_PRECISION)
            acc += part * scale_row(s_expert_ptr, block, offs_n, n_valid, stride_sr, stride_sn)[None, :]
    else:
        acc = _down_k_range(acc, h_base, w_base, s_expert_ptr, k_begin, k_end, slot_valid, offs_k, offs_n, n_valid,
                            stride_hf, stride_wk, stride_sr, stride_sn, rows_per_scale, act_dtype, BLOCK_K, SCALES,
                            DOT_FP32, DOT_PRECISION)
        if SCALES == "columns":
            acc *= scale_row(s_expert_ptr, 0, offs_n, n_valid, stride_sr, stride_sn)[None, :]

    gates = tl.load(gates_ptr + slots, mask=slot_valid, other=0.0)  # [BM] float32
    acc = acc * gates[:, None]
    tokens = (slots // TOP_K).to(tl.int64)
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + offs_n[None, :] * stride_od
    tl.atomic_add(out_ptrs, acc, mask=slot_valid[:, None] & n_valid[None, :], sem="relaxed")


def down_launch(h: torch.Tensor, w2: torch.Tensor, w2_scales: torch.Tensor | None, out: torch.Tensor,
                routing: Routing, config: GemmTiles, plan: DotPlan) -> tuple[tuple, tuple, dict]:
    """(grid, arguments, keywords) of one launch, shared with kernels.aot (see gate_up_launch)."""
    ffn, hidden = w2.shape[1], w2.shape[2]
    capacity = routing.sorted_slot_ids.shape[0]
    rows_per_scale, scales_mode = scale_mode(w2, w2_scales, config.block_k)
    scales = w2_scales if w2_scales is not None else w2
    gates = routing.topk_weights.reshape(-1)  # [S]
    grid = (triton.cdiv(capacity, routing.block_m) * triton.cdiv(hidden, config.block_n), config.split_k)
    args = (h, w2, scales, out, gates, routing.sorted_slot_ids, routing.block_expert_ids, routing.num_padded,
            routing.num_slots, ffn, hidden, capacity, rows_per_scale,
            h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
            scales.stride(0), scales.stride(1), scales.stride(2), out.stride(0), out.stride(1))
    keywords = {"TOP_K": routing.top_k, "BLOCK_M": routing.block_m, "BLOCK_N": config.block_n,
                "BLOCK_K": config.block_k, "GROUP_M": config.group_m, "SPLIT_K": config.split_k,
                "SCALES": scales_mode, "DOT_FP32": plan.dot_fp32, "DOT_PRECISION": plan.precision,
                "num_warps": config.num_warps, "num_stages": config.num_stages}
    return grid, args, keywords


def grouped_gemm_down(h: torch.Tensor, w2: torch.Tensor, w2_scales: torch.Tensor | None, routing: Routing,
                      config: GemmTiles | None = None) -> torch.Tensor:
    """h [S, F], w2 [L, F, D] (+ scales [L, R, D]) -> [T, D] in h.dtype (see the reference)."""
    check_device(_down_kernel, h, w2)
    config = config or GemmTiles(block_n=64, block_k=64)
    plan = DotPlan.for_activations(_down_kernel, h.dtype)
    # float32 accumulation target; for float32 activations it is the output itself.
    out = torch.zeros(routing.num_tokens, w2.shape[2], dtype=torch.float32, device=h.device)  # [T, D]
    if routing.sorted_slot_ids.shape[0] == 0:
        return out.to(h.dtype)
    grid, args, keywords = down_launch(h, w2, w2_scales, out, routing, config, plan)
    _down_kernel[grid](*args, **keywords)
    return out if h.dtype == torch.float32 else out.to(h.dtype)
