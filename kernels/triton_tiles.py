"""Triton device functions shared by the grouped GEMMs: weight tiles with in-kernel dequantization."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gelu_tanh(a):
    # 0.5 * (1 + tanh(u)) == sigmoid(2u): one exp, exact at both tails, no tanh intrinsic needed.
    u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
    return a / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def load_weight_tile(w_ptrs, s_ptr, k0, offs_k, offs_n, k_valid, n_valid, stride_sr, stride_sn, rows_per_scale,
                     ACT_DTYPE: tl.constexpr, HAS_SCALES: tl.constexpr, SCALE_UNIFORM: tl.constexpr,
                     DOT_FP32: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] weight tile starting at row k0, ready for tl.dot; offs_k are absolute rows.
    int8 tiles are dequantized as weight.float() * scale.float(), then rounded to the activation dtype
    like the reference does; scale row of weight row k is k // rows_per_scale."""
    w = tl.load(w_ptrs, mask=k_valid[:, None] & n_valid[None, :], other=0)
    if HAS_SCALES:
        if SCALE_UNIFORM:
            # The whole tile lies in one scale row block: one [BLOCK_N] row of scales.
            s = tl.load(s_ptr + (k0 // rows_per_scale) * stride_sr + offs_n * stride_sn,
                        mask=n_valid, other=0)
            w = w.to(tl.float32) * s.to(tl.float32)[None, :]
        else:
            s = tl.load(s_ptr + (offs_k // rows_per_scale)[:, None] * stride_sr + offs_n[None, :] * stride_sn,
                        mask=k_valid[:, None] & n_valid[None, :], other=0)
            w = w.to(tl.float32) * s.to(tl.float32)
    w = w.to(ACT_DTYPE)
    if DOT_FP32:
        w = w.to(tl.float32)
    return w
