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
from .triton_tiles import gelu_tanh, load_weight_tile

# Legend: T = tokens, S = slots, D = hidden (K of this GEMM), F = ffn, L = local experts, R = scale rows.


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, s_ptr, h_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_slots, hidden, ffn, capacity, rows_per_scale,
    stride_xt, stride_xd, stride_we, stride_wk, stride_wn, stride_se, stride_sr, stride_sn,
    stride_hs, stride_hf,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_SCALES: tl.constexpr, SCALE_UNIFORM: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(capacity, BLOCK_M)
    num_pid_n = tl.cdiv(ffn, BLOCK_N)
    # GROUP_M blocks of slots walk the same weight columns back to back, so a weight tile is still in
    # L2 when the next block of the same expert asks for it.
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
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

    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xd
    gate_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    value_ptrs = gate_ptrs + ffn * stride_wn
    s_gate_ptr = s_ptr + expert * stride_se
    s_value_ptr = s_gate_ptr + ffn * stride_sn
    act_dtype = x_ptr.dtype.element_ty

    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_value = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_rows = k0 + offs_k
        k_valid = k_rows < hidden
        a = tl.load(x_ptrs, mask=slot_valid[:, None] & k_valid[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
        gate = load_weight_tile(gate_ptrs, s_gate_ptr, k0, k_rows, offs_n, k_valid, n_valid, stride_sr,
                                stride_sn, rows_per_scale, act_dtype, HAS_SCALES, SCALE_UNIFORM, DOT_FP32)
        acc_gate = tl.dot(a, gate, acc_gate, input_precision=DOT_PRECISION)
        value = load_weight_tile(value_ptrs, s_value_ptr, k0, k_rows, offs_n, k_valid, n_valid, stride_sr,
                                 stride_sn, rows_per_scale, act_dtype, HAS_SCALES, SCALE_UNIFORM, DOT_FP32)
        acc_value = tl.dot(a, value, acc_value, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        gate_ptrs += BLOCK_K * stride_wk
        value_ptrs += BLOCK_K * stride_wk

    h = gelu_tanh(acc_gate) * acc_value
    h_ptrs = h_ptr + slots[:, None].to(tl.int64) * stride_hs + offs_n[None, :] * stride_hf
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=slot_valid[:, None] & n_valid[None, :])


def scale_layout(weight: torch.Tensor, scales: torch.Tensor | None, block_k: int) -> tuple[int, bool]:
    """(rows per scale row, whether every BLOCK_K tile sits inside one scale row block)."""
    rows = weight.shape[1]
    if scales is None:
        return rows, True
    rows_per_scale = rows // scales.shape[1]
    return rows_per_scale, scales.shape[1] == 1 or rows_per_scale % block_k == 0


def grouped_gemm_gate_up(x: torch.Tensor, w13: torch.Tensor, w13_scales: torch.Tensor | None,
                         routing: Routing, config: GemmTiles | None = None) -> torch.Tensor:
    """x [T, D], w13 [L, D, 2F] (+ scales [L, R, 2F]) -> h [S, F] in x.dtype (see the reference)."""
    check_device(_gate_up_kernel, x, w13)
    config = config or GemmTiles(block_n=64, block_k=64)
    plan = DotPlan.for_activations(_gate_up_kernel, x.dtype)
    ffn = w13.shape[2] // 2
    h = torch.empty(routing.num_slots, ffn, dtype=x.dtype, device=x.device)  # [S, F]
    capacity = routing.sorted_slot_ids.shape[0]
    if capacity == 0:
        return h
    rows_per_scale, uniform = scale_layout(w13, w13_scales, config.block_k)
    scales = w13_scales if w13_scales is not None else w13  # a placeholder pointer when unused
    grid = (triton.cdiv(capacity, routing.block_m) * triton.cdiv(ffn, config.block_n),)
    _gate_up_kernel[grid](
        x, w13, scales, h, routing.sorted_slot_ids, routing.block_expert_ids, routing.num_padded,
        routing.num_slots, w13.shape[1], ffn, capacity, rows_per_scale,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        scales.stride(0), scales.stride(1), scales.stride(2), h.stride(0), h.stride(1),
        TOP_K=routing.top_k, BLOCK_M=routing.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, HAS_SCALES=w13_scales is not None, SCALE_UNIFORM=uniform,
        DOT_FP32=plan.dot_fp32, DOT_PRECISION=plan.precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return h
