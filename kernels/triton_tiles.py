"""Triton device functions shared by the grouped GEMMs: program order and weight tiles (W8A16).

W8A16 as the tensor cores want it: an int8 value is exact in bfloat16 (and fp16, fp32), and a scale
that depends only on (row block, column) commutes with the dot product over the rows of one block.
So the K loop converts int8 to the activation dtype with no multiply, and the scales multiply the
float32 partial sum of each scale row block once: sum_b (x_b @ q_b) * s_b. Per weight that is one
convert instead of convert, multiply and round; and the dequantized weight is never rounded to
bfloat16, which brings the bfloat16 path closer to the reference's float32 dequantization.

How a kernel applies int8 scales (the constexpr SCALES, chosen by scale_mode):
- "none": float weights.
- "columns": one scale row (the release's column-parallel weights): the accumulator is scaled once
  after the K loop.
- "row_blocks": row-blocked scales whose blocks hold whole BLOCK_K tiles (linear_1's): an outer loop
  over the blocks, each a float32 partial sum scaled by its row.
- "per_element": blocks that split a BLOCK_K tile (tiny test shapes only): each element is
  dequantized before the dot product.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def scale_mode(weight: torch.Tensor, scales: torch.Tensor | None, block_k: int) -> tuple[int, str]:
    """(rows per scale row, SCALES) for a weight [L, K, N] with scales [L, R, N] and a BLOCK_K."""
    rows = weight.shape[1]
    if scales is None:
        return rows, "none"
    rows_per_scale = rows // scales.shape[1]
    if scales.shape[1] == 1:
        return rows_per_scale, "columns"
    return rows_per_scale, "row_blocks" if rows_per_scale % block_k == 0 else "per_element"


@triton.jit
def gelu_tanh(a):
    # 0.5 * (1 + tanh(u)) == sigmoid(2u): one exp, exact at both tails, no tanh intrinsic needed.
    u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
    return a / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(block of sorted slots, block of columns) of a program. GROUP_M blocks of slots walk the same
    weight columns back to back, so a weight tile is still in L2 when the next block of the same
    expert asks for it."""
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    return pid_m, pid_n


@triton.jit
def load_activation_tile(a_ptrs, slot_valid, k_valid, DOT_FP32: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] tile of activations gathered by slot; padding rows and rows past K read 0."""
    a = tl.load(a_ptrs, mask=slot_valid[:, None] & k_valid[None, :], other=0.0)
    if DOT_FP32:
        a = a.to(tl.float32)
    return a


@triton.jit
def load_weight_tile(w_ptrs, s_ptr, offs_k, offs_n, k_valid, n_valid, stride_sr, stride_sn, rows_per_scale,
                     ACT_DTYPE: tl.constexpr, SCALES: tl.constexpr, DOT_FP32: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] weight tile for tl.dot; offs_k are absolute rows.

    int8 tiles come back unscaled (the caller scales the accumulator), except for SCALES
    "per_element": the fallback for scale row blocks that split a BLOCK_K tile, where each element is
    dequantized as weight.float() * scale.float() and rounded to the activation dtype."""
    w = tl.load(w_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0)
    if SCALES == "per_element":
        s = tl.load(s_ptr + (offs_k // rows_per_scale)[:, None] * stride_sr + offs_n[None, :] * stride_sn,
                    mask=k_valid[:, None] & n_valid[None, :], other=0)
        w = w.to(tl.float32) * s.to(tl.float32)
    w = w.to(ACT_DTYPE)
    if DOT_FP32:
        w = w.to(tl.float32)
    return w


@triton.jit
def scale_row(s_ptr, block, offs_n, n_valid, stride_sr, stride_sn):
    """float32 [BLOCK_N]: scale row `block` of this program's columns."""
    return tl.load(s_ptr + block * stride_sr + offs_n * stride_sn, mask=n_valid, other=0).to(tl.float32)
