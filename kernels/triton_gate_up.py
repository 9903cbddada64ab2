"""Grouped GEMM 1: h = gelu_tanh(x @ linear) * (x @ linear_v) over the sorted slots, one expert per block.

Each program owns BLOCK_M sorted slots (one expert) and BLOCK_N columns of both halves of
[linear | linear_v], so the gate and value accumulators meet in registers and h is written once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .routing import Routing
from .tile_config import GemmTiles
from .triton_launch import DotPlan, check_device
from .triton_tiles import (
    gelu_tanh,
    grouped_pid,
    load_activation_tile,
    load_weight_tile,
    scale_mode,
    scale_row,
)

# Legend: T = tokens, S = slots, D = hidden (K of this GEMM), F = ffn, L = local experts, R = scale rows.


@triton.jit
def _gate_up_k_range(acc_gate, acc_value, x_base, gate_base, value_base, s_gate_ptr, s_value_ptr, k_lo, k_hi,
                     slot_valid, offs_k, offs_n, n_valid, stride_xd, stride_wk, stride_sr, stride_sn,
                     rows_per_scale, ACT_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, SCALES: tl.constexpr,
                     DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Both accumulators += x[:, k_lo:k_hi] @ weight tiles of rows k_lo..k_hi (unscaled int8)."""
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_rows = k0 + offs_k
        k_valid = k_rows < k_hi
        a = load_activation_tile(x_base + k0 * stride_xd, slot_valid, k_valid, DOT_FP32)
        gate = load_weight_tile(gate_base + k0 * stride_wk, s_gate_ptr, k_rows, offs_n, k_valid, n_valid,
                                stride_sr, stride_sn, rows_per_scale, ACT_DTYPE, SCALES, DOT_FP32)
        acc_gate = tl.dot(a, gate, acc_gate, input_precision=DOT_PRECISION)
        value = load_weight_tile(value_base + k0 * stride_wk, s_value_ptr, k_rows, offs_n, k_valid, n_valid,
                                 stride_sr, stride_sn, rows_per_scale, ACT_DTYPE, SCALES, DOT_FP32)
        acc_value = tl.dot(a, value, acc_value, input_precision=DOT_PRECISION)
    return acc_gate, acc_value


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, s_ptr, h_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_slots, hidden, ffn, capacity, rows_per_scale,
    stride_xt, stride_xd, stride_we, stride_wk, stride_wn, stride_se, stride_sr, stride_sn,
    stride_hs, stride_hf,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SCALES: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_pid(tl.program_id(0), tl.cdiv(capacity, BLOCK_M), tl.cdiv(ffn, BLOCK_N), GROUP_M)
    # The grid covers the worst-case padding; blocks past the real total stop here.
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return

    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    slot_valid = slots < num_slots
    tokens = (slots // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < ffn
    offs_k = tl.arange(0, BLOCK_K)

    x_base = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xd
    gate_base = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    value_base = gate_base + ffn * stride_wn
    s_gate_ptr = s_ptr + expert * stride_se
    s_value_ptr = s_gate_ptr + ffn * stride_sn
    act_dtype = x_ptr.dtype.element_ty

    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_value = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SCALES == "row_blocks":
        # One float32 partial sum per scale row block, scaled as it is added.
        for block in range(tl.cdiv(hidden, rows_per_scale)):
            k_lo = block * rows_per_scale
            part_gate, part_value = _gate_up_k_range(
                tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32),
                x_base, gate_base, value_base, s_gate_ptr, s_value_ptr, k_lo, tl.minimum(hidden, k_lo + rows_per_scale),
                slot_valid, offs_k, offs_n, n_valid, stride_xd, stride_wk, stride_sr, stride_sn, rows_per_scale,
                act_dtype, BLOCK_K, SCALES, DOT_FP32, DOT_PRECISION)
            acc_gate += part_gate * scale_row(s_gate_ptr, block, offs_n, n_valid, stride_sr, stride_sn)[None, :]
            acc_value += part_value * scale_row(s_value_ptr, block, offs_n, n_valid, stride_sr, stride_sn)[None, :]
    else:
        acc_gate, acc_value = _gate_up_k_range(
            acc_gate, acc_value, x_base, gate_base, value_base, s_gate_ptr, s_value_ptr, 0, hidden,
            slot_valid, offs_k, offs_n, n_valid, stride_xd, stride_wk, stride_sr, stride_sn, rows_per_scale,
            act_dtype, BLOCK_K, SCALES, DOT_FP32, DOT_PRECISION)
        if SCALES == "columns":
            acc_gate *= scale_row(s_gate_ptr, 0, offs_n, n_valid, stride_sr, stride_sn)[None, :]
            acc_value *= scale_row(s_value_ptr, 0, offs_n, n_valid, stride_sr, stride_sn)[None, :]

    h = gelu_tanh(acc_gate) * acc_value
    h_ptrs = h_ptr + slots[:, None].to(tl.int64) * stride_hs + offs_n[None, :] * stride_hf
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=slot_valid[:, None] & n_valid[None, :])


def gate_up_launch(x: torch.Tensor, w13: torch.Tensor, w13_scales: torch.Tensor | None, h: torch.Tensor,
                   routing: Routing, config: GemmTiles, plan: DotPlan) -> tuple[tuple, tuple, dict]:
    """(grid, arguments, keywords) of one launch: shared by the launcher and kernels.aot, so that
    what is compiled ahead of time is what runs."""
    ffn = w13.shape[2] // 2
    capacity = routing.sorted_slot_ids.shape[0]
    rows_per_scale, scales_mode = scale_mode(w13, w13_scales, config.block_k)
    scales = w13_scales if w13_scales is not None else w13  # a placeholder pointer when unused
    grid = (triton.cdiv(capacity, routing.block_m) * triton.cdiv(ffn, config.block_n),)
    args = (x, w13, scales, h, routing.sorted_slot_ids, routing.block_expert_ids, routing.num_padded,
            routing.num_slots, w13.shape[1], ffn, capacity, rows_per_scale,
            x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
            scales.stride(0), scales.stride(1), scales.stride(2), h.stride(0), h.stride(1))
    keywords = {"TOP_K": routing.top_k, "BLOCK_M": routing.block_m, "BLOCK_N": config.block_n,
                "BLOCK_K": config.block_k, "GROUP_M": config.group_m, "SCALES": scales_mode,
                "DOT_FP32": plan.dot_fp32, "DOT_PRECISION": plan.precision,
                "num_warps": config.num_warps, "num_stages": config.num_stages}
    return grid, args, keywords


def grouped_gemm_gate_up(x: torch.Tensor, w13: torch.Tensor, w13_scales: torch.Tensor | None,
                         routing: Routing, config: GemmTiles | None = None) -> torch.Tensor:
    """x [T, D], w13 [L, D, 2F] (+ scales [L, R, 2F]) -> h [S, F] in x.dtype (see the reference)."""
    check_device(_gate_up_kernel, x, w13)
    config = config or GemmTiles(block_n=64, block_k=64)
    plan = DotPlan.for_activations(_gate_up_kernel, x.dtype)
    h = torch.empty(routing.num_slots, w13.shape[2] // 2, dtype=x.dtype, device=x.device)  # [S, F]
    if routing.sorted_slot_ids.shape[0] == 0:
        return h
    grid, args, keywords = gate_up_launch(x, w13, w13_scales, h, routing, config, plan)
    _gate_up_kernel[grid](*args, **keywords)
    return h
